"""DVC stage `train_<model>`: train FCN-32s, FCN-16s or FCN-8s with the active params profile.

With `train.nproc` > 1 the stage re-launches itself under torchrun (one process per GPU or CPU
slot, DDP); DVC sees a single command either way.

The process dies with its launcher (a killed `dvc` leaves no trainer behind, torchrun and its
ranks included), and an interrupted run resumes from `.fcn-resume/<model>/` at the repository
root (`pipeline.train.resume_root`), under `dvc repro`, `dvc exp run` and queued experiments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import MODEL_NAMES, load_params
from pipeline.inputs import MissingInputsError, require_inputs

PREVIOUS = {"fcn32s": None, "fcn16s": "fcn32s", "fcn8s": "fcn16s"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", choices=MODEL_NAMES, help="which stage of the cascade to train")
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
    args = ap.parse_args(argv)

    from pipeline.train import StageBusyError, die_with_parent, resume_root, train

    # before the torchrun relaunch: the setting survives execv, so torchrun dies with dvc too
    die_with_parent()

    cfg = load_params(args.params)
    models = Path(args.models)
    prev = PREVIOUS[args.model]
    # fail in a second with the DVC stage to run, not with a traceback after the relaunch
    inputs = {
        Path(args.data) / "train" / "index.json": ("preprocess", "training shards"),
        Path(args.data) / "val" / "index.json": ("preprocess", "val shards"),
    }
    if prev:
        inputs[models / f"{prev}.pt"] = (f"train_{prev}", "model file")
    elif cfg["model"]["backbone_init"] == "vgg16":
        inputs[Path(args.vgg16)] = ("download_vgg16", "VGG16 weights")
    try:
        require_inputs(inputs)
    except MissingInputsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    nproc = cfg["train"]["nproc"]
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        # Re-launch under torchrun: one DDP process per slot, same arguments.
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "stages.train",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        print(f"[train] launching {nproc} processes: {' '.join(cmd)}", flush=True)
        os.execv(sys.executable, cmd)

    try:
        result = train(
            args.model,
            cfg,
            train_dir=Path(args.data) / "train",
            val_dir=Path(args.data) / "val",
            out_model=models / f"{args.model}.pt",
            resume_dir=Path(args.resume_dir) if args.resume_dir else resume_root() / args.model,
            live_dir=Path("dvclive") / args.model,
            vgg16_path=Path(args.vgg16) if cfg["model"]["backbone_init"] == "vgg16" else None,
            init_from=models / f"{prev}.pt" if prev else None,
            progress=not args.no_progress,
        )
    except StageBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        s = result["scores"]
        if s.get("mean_iou") is not None:
            print(
                f"[train] {args.model}: val mean IoU {s['mean_iou']:.4f}, "
                f"pixel accuracy {s['pixel_accuracy']:.4f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
