"""Helpers for integration tests that drive the real `git` and `dvc` CLIs in a copy of the repo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# dvc.yaml's stages in the order `dvc repro` runs them, and the four FCN metrics
ALL_STAGES = [
    "download_voc",
    "download_coco",
    "download_sbd",
    "download_vgg16",
    "coco_to_voc",
    "preprocess",
    "data_card",
    "train_fcn32s",
    "train_fcn16s",
    "train_fcn8s",
    "evaluate",
    "inference_report",
    "export_onnx",
]
AFTER_EVALUATE = ALL_STAGES[ALL_STAGES.index("evaluate") + 1 :]
FOUR = ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou")

# A sample run small enough for the test suite: same stages and code, fewer/smaller images.
FAST_SAMPLE: dict[str, Any] = {
    "sample.download.sample.voc_train": 12,
    "sample.download.sample.voc_val": 6,
    "sample.download.sample.coco_train": 8,
    "sample.download.sample.coco_val": 4,
    "sample.download.sample.max_side": 160,
    "sample.preprocess.max_size": 96,
    "sample.download.vgg16.pretrain.train_per_class": 3,
    "sample.download.vgg16.pretrain.val_per_class": 1,
    "sample.download.vgg16.pretrain.epochs": 1,
    "sample.train.precision": "fp32",  # bit-identical runs in every clone, whatever the CPU
    "sample.train.crop_size": 64,
    "sample.train.workers": 0,
    "sample.train.fcn32s.epochs": 2,
    "sample.train.fcn16s.epochs": 1,
    "sample.train.fcn8s.epochs": 1,
    "sample.train.val_every": 1,  # a val point at every epoch end: the curves tests compare
    "sample.evaluate.qualitative_images": 2,
    "sample.inference.warmup": 0,
    "sample.inference.repeats": 1,
    "sample.inference.val_images": 1,
    "sample.export.val_images": 1,
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        PYTHONUNBUFFERED="1",
    )
    # stages run `python -m stages.x` from the copy's root, so the copy's own code is used
    e.pop("PYTHONPATH", None)
    bindir = str(Path(sys.executable).parent)
    e["PATH"] = bindir + os.pathsep + e.get("PATH", "")
    return e


def run(
    args: list[str], cwd: Path, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({p.returncode}) in {cwd}\n"
            f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
        )
    return p


def copy_repo(dst: Path) -> Path:
    """Copy the project's tracked and untracked-but-not-ignored files, then commit them."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dst.mkdir(parents=True, exist_ok=True)
    for f in filter(None, files):
        src = REPO / f
        if not src.is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)
    run(["git", "init", "-q", "-b", "main"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "copy of the project"], dst)
    return dst


def set_params(repo: Path, overrides: dict[str, Any]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran (not skipped) from its output."""
    ran = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    return ran


def wait_for(
    proc: subprocess.Popen,
    log: Path,
    ready: Callable[[], Any],
    what: str,
    timeout_s: float = 300.0,
    poll_s: float = 0.02,
) -> None:
    """Poll `ready()` until it is true while `proc` (started in a session of its own) runs, then
    freeze its whole process group (SIGSTOP) so that the state the test saw is the state it
    kills: a small run can otherwise finish, and remove its checkpoint, between the poll and the
    kill. SIGKILL (and PR_SET_PDEATHSIG's SIGKILL) still ends stopped processes.

    Fails the test with `proc`'s log if it ends before `what` happens, or after `timeout_s`
    seconds, killing its whole process group then.
    """
    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGSTOP)
            if ready():  # still true once frozen: not a state it was leaving
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
        if proc.poll() is not None:
            cmd = " ".join(map(str, proc.args))
            pytest.fail(f"{cmd} ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(poll_s)


# --- shards of VOC-layout pairs, without the data stages ----------------------------------


def voc_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def write_voc_shards(voc: Path, ids: list[str], out: Path, side: int | None, square: bool) -> Path:
    """Real VOC pairs resized to longer side `side` (image bilinear, label nearest; None: kept at
    their original resolution), optionally centre-cropped to a square first (then a crop of
    `side` sees the whole image, no padding)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.shards import ShardWriter

    with ShardWriter(out) as writer:
        for i in ids:
            image = Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")
            label = Image.open(voc / "SegmentationClass" / f"{i}.png")  # mode P: indices
            if square:
                m = min(image.size)
                box = ((image.width - m) // 2, (image.height - m) // 2)
                box = (*box, box[0] + m, box[1] + m)
                image, label = image.crop(box), label.crop(box)
            s = 1.0 if side is None else side / max(image.size)
            size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
            image = image.resize(size, Image.BILINEAR)
            label = Image.fromarray(np.asarray(label.resize(size, Image.NEAREST)), "L")
            jpg, png = io.BytesIO(), io.BytesIO()
            image.save(jpg, "JPEG", quality=95)
            label.save(png, "PNG")
            writer.add(
                f"voc/{i}",
                {"image": jpg.getvalue(), "label": png.getvalue()},
                {"height": size[1], "width": size[0], "source": "voc"},
            )
    return out


def scores_on(model: Any, directory: Path) -> tuple[Any, list[Any]]:
    """The confusion matrix (rows: ground truth) of `model` over every record of a shard dir
    at its stored resolution, and the per-image argmax maps."""
    import torch

    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform
    from pipeline.evaluation.metrics import confusion_matrix

    data = SegmentationShards(directory, transform=eval_transform())
    hist = torch.zeros(21, 21, dtype=torch.int64)
    preds = []
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            image, mask = data[i]
            pred = model(image.unsqueeze(0)).argmax(1)[0]
            hist += confusion_matrix(pred, mask)
            preds.append(pred)
    return hist, preds
