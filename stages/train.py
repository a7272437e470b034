"""DVC stage `train_<model>`: train FCN-32s, FCN-16s or FCN-8s with the active params profile.

With `train.nproc` > 1 or `train.nnodes` > 1 the stage re-launches itself under torchrun (one
process per GPU or CPU slot, DDP; `pipeline.training.launch.torchrun_command`); DVC sees a
single command either way. On several machines each runs the stage with its own
`train.node_rank`; node 0 (the one that runs dvc) hosts the rendezvous at `train.rdzv_endpoint`
and writes the model.

The process dies with its launcher (a killed `dvc` leaves no trainer behind, torchrun and its
ranks included), and an interrupted run resumes from `.fcn-resume/<model>/` at the repository
root (`pipeline.training.resume.resume_root`), under `dvc repro`, `dvc exp run` and queued
experiments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import CASCADE, ParamsError, load_params
from pipeline.inputs import MissingInputsError, require_inputs
from pipeline.training.recipe import model_config, train_config


def parser() -> argparse.ArgumentParser:
    """The stage's command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", choices=CASCADE, help="which stage of the cascade to train")
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument("--data", default="data/preprocessed", help="preprocessed shard root")
    ap.add_argument("--models", default="models", help="where model files are read and written")
    ap.add_argument("--vgg16", default="data/raw/vgg16/vgg16.pth", help="VGG16 weights (FCN-32s)")
    ap.add_argument(
        "--resume-dir",
        default=None,
        help="resume folder of this stage (default: <repo>/.fcn-resume/<model>, or "
        "$FCN_RESUME_DIR/<model>)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the stage. Exit codes: 0 done, 1 params or inputs missing, 3 the stage is busy."""
    args = parser().parse_args(argv)

    from pipeline.training import launch
    from pipeline.training.distributed import StageBusyError, die_with_parent

    # before the torchrun relaunch: the setting survives execv, so torchrun dies with dvc too
    die_with_parent()
    try:
        cfg = load_params(args.params)
        tc = train_config(cfg)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = launch.StageFiles(
        Path(args.data),
        Path(args.models),
        Path(args.vgg16),
        Path(args.resume_dir) if args.resume_dir else None,
    )
    try:  # fail in a second with the DVC stage to run, not with a traceback after the relaunch
        require_inputs(files.required(tc.stages[args.model], model_config(cfg)))
    except MissingInputsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if launch.needs_torchrun(tc) and "LOCAL_RANK" not in os.environ:
        launch.relaunch_under_torchrun(tc, argv if argv is not None else sys.argv[1:])
    try:
        result = launch.run_stage(args.model, cfg, files, progress=not args.no_progress)
    except StageBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    launch.report_scores(args.model, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
