"""DVC stage `train_<model>`: train FCN-32s, FCN-16s or FCN-8s with the active params profile.

With `train.nproc` > 1 or `train.nnodes` > 1 the stage re-launches itself under torchrun (one
process per GPU or CPU slot, DDP; `torchrun_command`); DVC sees a single command either way.
On several machines each runs the stage with its own `train.node_rank`; node 0 (the one that
runs dvc) hosts the rendezvous at `train.rdzv_endpoint` and writes the model.

The process dies with its launcher (a killed `dvc` leaves no trainer behind, torchrun and its
ranks included), and an interrupted run resumes from `.fcn-resume/<model>/` at the repository
root (`pipeline.training.train.resume_root`), under `dvc repro`, `dvc exp run` and queued experiments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import MODEL_NAMES, ParamsError, initialised_from, load_params
from pipeline.inputs import MissingInputsError, require_inputs


def needs_torchrun(tcfg: dict[str, Any]) -> bool:
    """Whether the `train` params ask for more than one process in all (DDP)."""
    return tcfg["nproc"] > 1 or tcfg.get("nnodes", 1) > 1


def torchrun_command(tcfg: dict[str, Any], argv: list[str]) -> list[str]:
    """The argv that re-runs `python -m stages.train <argv>` under torchrun for the `train`
    params `tcfg`: `train.nproc` processes on this node; one node: `--standalone` (a private
    rendezvous on a free local port); `train.nnodes` > 1: a static rendezvous at
    `train.rdzv_endpoint` (HOST:PORT of node 0) with this node's `train.node_rank`. Static,
    not c10d: c10d ignores `--node-rank` and orders nodes its own way, while global rank 0
    (which writes the model and the resume state) must run on node 0, the node that runs dvc.

    Raises:
        ValueError: `train.nnodes` > 1 without `train.rdzv_endpoint`, or `train.node_rank` not
            in 0..nnodes-1.
    """
    nproc, nnodes = tcfg["nproc"], tcfg.get("nnodes", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        endpoint, node_rank = tcfg.get("rdzv_endpoint"), tcfg.get("node_rank", 0)
        if not endpoint:
            raise ValueError(
                f"train.rdzv_endpoint: must be set (HOST:PORT of node 0) when train.nnodes "
                f"is {nnodes} > 1"
            )
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"train.node_rank: {node_rank} is not in 0..{nnodes - 1}")
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={endpoint}",
        ]
    return [*cmd, f"--nproc-per-node={nproc}", "-m", "stages.train", *argv]


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

    from pipeline.training.train import StageBusyError, die_with_parent, resume_root, train

    # before the torchrun relaunch: the setting survives execv, so torchrun dies with dvc too
    die_with_parent()

    try:
        cfg = load_params(args.params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    models = Path(args.models)
    prev = initialised_from(args.model, cfg["train"])  # None: from VGG16
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

    tcfg = cfg["train"]
    if needs_torchrun(tcfg) and "LOCAL_RANK" not in os.environ:
        # Re-launch under torchrun: one DDP process per slot, same arguments.
        try:
            cmd = torchrun_command(tcfg, argv if argv is not None else sys.argv[1:])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        nodes = tcfg.get("nnodes", 1)
        where = f" on node {tcfg.get('node_rank', 0)} of {nodes}" if nodes > 1 else ""
        print(f"[train] launching {tcfg['nproc']} processes{where}: {' '.join(cmd)}", flush=True)
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
