"""Running a training stage from the command line: its files, the torchrun relaunch, the run.

`stages/train.py` parses the command line and maps errors to exit codes; what a stage reads
and writes (`StageFiles`), whether and how it re-launches itself under torchrun for DDP
(`torchrun_command`) and the call of the training loop (`run_stage`) live here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pipeline.data.shards import INDEX_NAME
from pipeline.training.recipe import ModelConfig, StageRecipe, TrainConfig


@dataclass(frozen=True)
class StageFiles:
    """Where a training stage reads and writes, as the command line gives them."""

    data: Path  # the preprocessed shard root: <data>/train, <data>/val
    models: Path  # model files: read the previous stage's, write this stage's
    vgg16: Path  # the VGG16 weights (a stage that starts from VGG16)
    resume_dir: Path | None  # None: <resume_root()>/<model>

    def init_from(self, stage: StageRecipe) -> Path | None:
        """The previous stage's model file `stage` starts from, or None: from VGG16."""
        prev = stage.initialised_from
        return self.models / f"{prev}.pt" if prev else None

    def vgg16_path(self, model: ModelConfig) -> Path | None:
        """The VGG16 weights, when the model section initialises the backbone from them."""
        return self.vgg16 if model.backbone_init == "vgg16" else None

    def required(self, stage: StageRecipe, model: ModelConfig) -> dict[Path, tuple[str, str]]:
        """{input file: (the DVC stage that makes it, what it is)} for `require_inputs`: the
        shards, then the model file it starts from or the VGG16 weights."""
        inputs = {
            self.data / "train" / INDEX_NAME: ("preprocess", "training shards"),
            self.data / "val" / INDEX_NAME: ("preprocess", "val shards"),
        }
        init_from = self.init_from(stage)
        if init_from is not None:
            inputs[init_from] = (f"train_{init_from.stem}", "model file")
        elif self.vgg16_path(model) is not None:
            inputs[self.vgg16] = ("download_vgg16", "VGG16 weights")
        return inputs


def needs_torchrun(tc: TrainConfig) -> bool:
    """Whether the `train` params ask for more than one process in all (DDP)."""
    return tc.processes > 1


def torchrun_command(tc: TrainConfig, argv: list[str]) -> list[str]:
    """The argv that re-runs `python -m stages.train <argv>` under torchrun: `tc.nproc`
    processes on this node; one node: `--standalone` (a private rendezvous on a free local
    port); `tc.nnodes` > 1: a static rendezvous at `tc.rdzv_endpoint` (HOST:PORT of node 0)
    with this node's `tc.node_rank` (both checked by `pipeline.config`). Static, not c10d:
    c10d ignores `--node-rank` and orders nodes its own way, while global rank 0 (which writes
    the model and the resume state) must run on node 0, the node that runs dvc.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if tc.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={tc.nnodes}",
            f"--node-rank={tc.node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={tc.rdzv_endpoint}",
        ]
    return [*cmd, f"--nproc-per-node={tc.nproc}", "-m", "stages.train", *argv]


def relaunch_under_torchrun(tc: TrainConfig, argv: list[str]) -> NoReturn:
    """Replace this process with `torchrun_command(tc, argv)` (one DDP process per slot,
    the same arguments), saying so first."""
    cmd = torchrun_command(tc, argv)
    where = f" on node {tc.node_rank} of {tc.nnodes}" if tc.nnodes > 1 else ""
    print(f"[train] launching {tc.nproc} processes{where}: {' '.join(cmd)}", flush=True)
    os.execv(sys.executable, cmd)


def run_stage(
    model: str, cfg: dict[str, Any], files: StageFiles, *, progress: bool
) -> dict[str, Any]:
    """Train stage `model` with the DVC stage's outputs: `<models>/<model>.pt` and
    `dvclive/<model>/`. Returns what `train` returns.

    Raises what `pipeline.training.train.train` raises (`StageBusyError` among them).
    """
    from pipeline.training.recipe import model_config, train_config
    from pipeline.training.resume import resume_root
    from pipeline.training.train import train

    stage, backbone = train_config(cfg).stages[model], model_config(cfg)
    return train(
        model,
        cfg,
        train_dir=files.data / "train",
        val_dir=files.data / "val",
        out_model=files.models / f"{model}.pt",
        resume_dir=files.resume_dir if files.resume_dir else resume_root() / model,
        live_dir=Path("dvclive") / model,
        vgg16_path=files.vgg16_path(backbone),
        init_from=files.init_from(stage),
        progress=progress,
    )


def report_scores(model: str, result: dict[str, Any]) -> None:
    """On global rank 0: the last validation's mean IoU and pixel accuracy, one line."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    s = result["scores"]
    if s.get("mean_iou") is not None:
        print(
            f"[train] {model}: val mean IoU {s['mean_iou']:.4f}, "
            f"pixel accuracy {s['pixel_accuracy']:.4f}",
            flush=True,
        )
