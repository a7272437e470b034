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

# The test suite's own sample profile: the same stages and code as the shipped `sample`
# profile, with every recipe value the tests depend on set here (never read from params.yaml,
# so tuning the shipped recipe cannot break a test) and sized for a test: few small images, a
# narrow VGG16, a few steps. Deterministic on CPU (fp32, no loader workers); FCN-32s trains 2
# epochs of 4 steps with a checkpoint every 2 steps, so a kill at the first checkpoint lands
# mid-epoch. The session's `sample_run` (conftest) reproduces exactly this profile, so it is also
# the uninterrupted reference run of the kill and resume tests.
TINY_SAMPLE: dict[str, Any] = {
    "profile": "sample",
    "download.generate_sample": True,
    "download.sample.seed": 0,
    "download.sample.voc_train": 8,
    "download.sample.voc_val": 4,
    "download.sample.coco_train": 4,
    "download.sample.coco_val": 4,
    "download.sample.min_side": 120,
    "download.sample.max_side": 160,
    "download.vgg16.pretrain.train_per_class": 3,
    "download.vgg16.pretrain.val_per_class": 1,
    "download.vgg16.pretrain.epochs": 1,
    "download.vgg16.pretrain.batch_size": 16,
    "download.vgg16.pretrain.lr": 0.001,
    "download.vgg16.pretrain.workers": 0,
    "coco_to_voc.min_pixels": 200,
    "coco_to_voc.workers": 1,
    "preprocess.max_size": 96,
    "preprocess.use_coco": True,
    "preprocess.sbd": None,
    "preprocess.workers": 1,
    "model.width": 0.0625,
    "model.backbone_init": "vgg16",
    "model.dropout": 0.0,
    "train.device": "cpu",
    "train.precision": "fp32",  # bit-identical runs in every clone, whatever the CPU
    "train.compile": False,
    "train.nproc": 1,
    "train.batch_size": 4,
    "train.accumulate": 1,
    "train.workers": 0,
    "train.seed": 0,
    "train.crop_size": 64,
    "train.scale_range": [0.75, 1.25],
    "train.hflip": True,
    "train.color_jitter": 0.1,
    "train.loss": "mean",
    "train.lr_policy": "poly",
    "train.momentum": 0.9,
    "train.weight_decay": 0.0005,
    "train.score_lr_mult": 10,
    "train.checkpoint_every": 2,
    "train.checkpoint_minutes": 1,
    "train.val_every": 1,  # a val point at every epoch end: the curves tests compare
    "train.val_every_iter": None,
    "train.fcn32s.epochs": 2,
    "train.fcn32s.lr": 0.001,
    "train.fcn16s.epochs": 1,
    "train.fcn16s.lr": 0.0003,
    "train.fcn8s.epochs": 1,
    "train.fcn8s.lr": 0.001,
    "evaluate.device": "cpu",
    "evaluate.precision": "fp32",
    "evaluate.qualitative_images": 2,
    "inference.warmup": 0,
    "inference.repeats": 1,
    "inference.val_images": 1,
    "export.val_images": 1,
}


def profile_params(profile: str = "sample", root: Path = REPO) -> dict[str, Any]:
    """`profile` as Hydra composes it from `root`/conf (what `dvc exp run -S profile=<profile>`
    writes to params.yaml): every key the schema wants, in the file's layout."""
    from pipeline.profiles import compose_profile

    return compose_profile(profile, root / "conf")


def tiny_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sample profile's layout with TINY_SAMPLE and then `overrides` (dotted keys) applied:
    the values a test relies on are TINY_SAMPLE's or the test's own."""
    return _apply(profile_params("sample"), {**TINY_SAMPLE, **(overrides or {})})


def _apply(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of `overrides` in `params` (an existing key: a typo fails loudly)."""
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        if last not in node:
            raise KeyError(f"{dotted}: no such key in params")
        node[last] = value
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """Write `params` to `path`, a params.yaml. In a repo copy (conf/ beside it) the same
    values also become conf/profile/<profile>.yaml, which Hydra composes params.yaml from on
    every `dvc exp run`: otherwise the first experiment would bring the shipped values back."""
    text = yaml.safe_dump(params, sort_keys=False)
    path.write_text(text)
    profile_file = path.parent / "conf" / "profile" / f"{params['profile']}.yaml"
    if profile_file.exists():
        profile_file.write_text("# @package _global_\n" + text)
    return path


def write_tiny_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write `tiny_params(overrides)` to `path` (a params.yaml for a repo copy or a stage)."""
    return write_params(path, tiny_params(overrides))


def tiny_cfg(overrides: dict[str, Any] | None = None, tmp: Path | None = None) -> dict[str, Any]:
    """The active profile of `tiny_params(overrides)` as `pipeline.config.load_params` returns
    it (validated), for tests that call the library in-process."""
    import tempfile

    from pipeline.config import load_params

    with tempfile.TemporaryDirectory(dir=tmp) as d:
        return load_params(write_tiny_params(Path(d) / "params.yaml", overrides))


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
    """Change dotted keys of `repo`'s params (`train.fcn8s.lr`), in params.yaml and in the
    conf/ profile Hydra composes it from."""
    path = repo / "params.yaml"
    write_params(path, _apply(yaml.safe_load(path.read_text()), overrides))


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


def before_its_run(reproduced: Path, dst: Path, restore: tuple[str, ...] = ()) -> Path:
    """A copy of a reproduced repo (`sample_run`) as it was before its `dvc repro`: the same
    commit of params and code, no outputs, no resume state. The stages in `restore` (with their
    upstream) are checked out from the copied run-cache and committed, then the run-cache is
    removed and the cache collected (`dvc gc --workspace`), so that every other stage really
    runs and caches its outputs, as in a clone that ran only the restored stages.
    """
    shutil.copytree(reproduced, dst, symlinks=True)
    run(["git", "reset", "-q", "--hard", "HEAD~1"], dst)
    # every output and other ignored file, but for DVC's cache and state
    run(["git", "clean", "-fdqx", "-e", "/.dvc/cache", "-e", "/.dvc/tmp"], dst)
    if restore:
        out = run(["dvc", "repro", *restore], dst).stdout
        assert stages_run(out) == [], f"{restore}: not all restored from the run-cache\n{out}"
        run(["git", "add", "-A"], dst)
        run(["git", "commit", "-qm", f"{', '.join(restore)} (from the run-cache)"], dst)
    shutil.rmtree(dst / ".dvc" / "cache" / "runs", ignore_errors=True)
    run(["dvc", "gc", "--workspace", "--force", "-q"], dst)
    return dst


# --- processes that are killed -----------------------------------------------------------------


def start_dvc(
    args: list[str],
    repo: Path,
    log: Path,
    shell: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """A dvc command in a session of its own (killpg reaches it and every stage process), its
    output in `log`; `shell` sets $SHELL, which dvc runs stage commands with; `extra_env` is
    added to the environment of dvc and every stage."""
    e = {**env(), **(extra_env or {})}
    if shell is not None:
        e["SHELL"] = shell
    with open(log, "w") as f:
        return subprocess.Popen(
            args, cwd=repo, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (PID 1 of a container may never reap)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the command and every process of its group: nobody cleans up after itself.
    Returns once none of them is alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while members := live_members(proc.pid):
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {members}"
        time.sleep(0.02)


# --- what a run left -------------------------------------------------------------------------


def md5_file(path: Path) -> str:
    """MD5 of a file's bytes, as DVC names its objects and records outputs in dvc.lock."""
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def model_weights(path: Path) -> dict[str, Any]:
    """The state dict of a model file the train stages write (weights only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same_weights(a: Path, b: Path) -> bool:
    """Two model files hold bit-identical weights under the same names."""
    import torch

    wa, wb = model_weights(a), model_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def live_curves(repo: Path, name: str) -> dict[str, list[list[str]]]:
    """Every DVCLive curve of model `name`, timestamps dropped (they differ run to run)."""
    out = {}
    for tsv in sorted((repo / "dvclive" / name / "plots").rglob("*.tsv")):
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        keep = [i for i, h in enumerate(rows[0]) if h != "timestamp"]
        out[str(tsv.relative_to(repo))] = [[r[i] for i in keep] for r in rows]
    return out


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


def scores_on(model: Any, directory: Path) -> Any:
    """The confusion matrix (rows: ground truth) of `model` over every record of a shard dir
    at its stored resolution, scored by the pipeline's own `evaluate_model` (CPU, fp32)."""
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform
    from pipeline.evaluation.score import evaluate_model

    data = SegmentationShards(directory, transform=eval_transform())
    return evaluate_model(
        model, data, device="cpu", precision="fp32", channels_last=False, progress=False
    )


def predictions_on(model: Any, directory: Path) -> list[Any]:
    """The argmax label map (uint8 [H, W]) of `model` for every record of a shard dir."""
    import torch

    from pipeline.data.datasets import SegmentationShards
    from pipeline.inference.predict import predict_labels

    data = SegmentationShards(directory)
    model.eval()
    return [predict_labels(model, torch.as_tensor(data[i][0])[None])[0] for i in range(len(data))]
