"""Interrupted and repeated training runs cost nothing.

- kill -9 under `dvc exp run`, then the same command: training resumes where it stopped and
  ends with the weights and curves of an uninterrupted run;
- params a -> b -> a under `dvc repro`: the third run is restored from the run-cache;
- kill -9 of `dvc` alone: no trainer (nor loader worker) survives it;
- edits that cannot change FCN-32s's result (another stage's lr, `workers`, the checkpoint
  cadence) resume it, also from a queued experiment's temporary copy; its own lr starts over
  and says why;
- a run that stops between its last checkpoint and the model file finishes without training;
- a second run of the same stage is refused, naming the process that holds it.

The slow tests drive the real `dvc` and `git` CLIs in copies of the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.data.shards import INDEX_NAME
from pipeline.training.distributed import StageBusyError, exclusive_lock
from pipeline.training.resume import (
    CheckpointCadence,
    ResumeStore,
    RunInputs,
    declared_params,
    resume_root,
)
from tests.repo_utils import (
    AFTER_EVALUATE,
    REPO,
    TINY_SAMPLE,
    before_its_run,
    env,
    kill_group,
    live_curves,
    md5_file,
    run,
    same_weights,
    set_params,
    stages_run,
    start_dvc,
    tiny_params,
    wait_for,
)

# The session's sample run (conftest `sample_run`) is the test profile reproduced without an
# interruption: the reference every interrupted run must end equal to. Its FCN-32s trains 2
# epochs of 4 steps with a checkpoint every 2 steps (TINY_SAMPLE).
MODELS = ("fcn32s", "fcn16s", "fcn8s")
TIMEOUT_S = 300
LR = TINY_SAMPLE["train.fcn32s.lr"]


def _checkpoints(repo: Path, name: str = "fcn32s") -> list[Path]:
    return sorted((repo / ".fcn-resume" / name).glob("*/last.pt"))


def _iteration(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["iteration"]


def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def prepared(sample_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample run's repo before its run, with its data stages (and the VGG16 weights)
    restored and committed: what a kill mid-training finds."""
    dst = tmp_path_factory.mktemp("resume") / "prepared"
    return before_its_run(sample_run[0], dst, ("preprocess", "download_vgg16"))


@pytest.fixture(scope="module")
def reference(sample_run) -> Path:
    """The uninterrupted run of the same params and data (read-only)."""
    return sample_run[0]


# --- the acceptance runs (real dvc/git) --------------------------------------------------------


@pytest.mark.slow
def test_kill_9_under_exp_run_then_the_same_exp_run_resumes(prepared, reference, tmp_path):
    repo = _clone(prepared, tmp_path / "killed")
    log = tmp_path / "killed.log"
    proc = start_dvc(["dvc", "exp", "run", "train_fcn32s"], repo, log)
    try:
        wait_for(proc, log, lambda: _checkpoints(repo), "the first FCN-32s checkpoint")
    finally:
        kill_group(proc)
    assert not (repo / "models" / "fcn32s.pt").exists()
    (ckpt,) = _checkpoints(repo)
    at = _iteration(ckpt)
    assert 0 < at < 8

    out = run(["dvc", "exp", "run", "train_fcn32s"], repo, timeout=TIMEOUT_S).stdout
    assert f"[train] fcn32s: resuming from {ckpt} at iteration {at}" in out, out
    assert not _checkpoints(repo), "a completed run keeps no resume state"

    ref = reference
    assert same_weights(repo / "models" / "fcn32s.pt", ref / "models" / "fcn32s.pt")
    curves = live_curves(repo, "fcn32s")
    assert curves == live_curves(ref, "fcn32s")
    for path, rows in curves.items():  # one row per epoch, none twice
        steps = [r[0] for r in rows[1:]]
        assert len(steps) == len(set(steps)) == 2, (path, rows)


@pytest.mark.slow
def test_params_a_b_a_restores_every_train_stage_from_the_run_cache(reference, tmp_path):
    repo = _clone(reference, tmp_path / "aba")
    first = {name: md5_file(repo / "models" / f"{name}.pt") for name in MODELS}
    crop = TINY_SAMPLE["train.crop_size"]
    set_params(repo, {"train.crop_size": crop // 2})  # declared by all three; a quick b
    out = run(["dvc", "repro"], repo, timeout=3 * TIMEOUT_S).stdout
    # the model cards (inference_report) state the crop size; export_onnx reads the models
    after = [f"train_{m}" for m in MODELS] + ["evaluate", *AFTER_EVALUATE]
    assert stages_run(out) == after, out

    set_params(repo, {"train.crop_size": crop})
    out = run(["dvc", "repro"], repo, timeout=TIMEOUT_S).stdout
    for stage in after:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert stages_run(out) == [], out
    assert {name: md5_file(repo / "models" / f"{name}.pt") for name in MODELS} == first


@pytest.mark.slow
def test_kill_9_of_dvc_alone_leaves_no_trainer_and_the_rerun_resumes(prepared, tmp_path):
    repo = _clone(prepared, tmp_path / "orphan")
    set_params(repo, {"train.workers": 1})  # a loader worker too
    log = tmp_path / "orphan.log"
    # dvc runs stage commands with $SHELL -c; dash (Debian's /bin/sh) forks rather than execs
    # the last command, the case where a trainer could outlive dvc under an orphaned shell
    proc = start_dvc(["dvc", "repro", "train_fcn32s"], repo, log, shell="/bin/sh")
    try:
        wait_for(proc, log, lambda: _checkpoints(repo), "the first FCN-32s checkpoint")
        tree = psutil.Process(proc.pid).children(recursive=True)
        trainers = [p for p in tree if "stages.train" in " ".join(p.cmdline())]
        assert trainers, [p.cmdline() for p in tree]
        os.kill(proc.pid, signal.SIGKILL)  # dvc only, not its group
        proc.wait(timeout=30)
        # wait_for froze the group; a process that outlived dvc must be free to run on
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"outlived dvc: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        kill_group(proc)
    (ckpt,) = _checkpoints(repo)
    at = _iteration(ckpt)
    out = run(["dvc", "repro", "train_fcn32s"], repo, timeout=TIMEOUT_S).stdout
    assert f"resuming from {ckpt} at iteration {at}" in out, out
    assert (repo / "models" / "fcn32s.pt").is_file() and not _checkpoints(repo)


@pytest.mark.slow
def test_only_fcn32s_own_inputs_decide_whether_it_resumes(prepared, tmp_path):
    repo = _clone(prepared, tmp_path / "edits")
    log = tmp_path / "edits.log"
    proc = start_dvc(["dvc", "repro", "train_fcn32s"], repo, log)
    try:
        wait_for(proc, log, lambda: _checkpoints(repo), "the first FCN-32s checkpoint")
    finally:
        kill_group(proc)
    (ckpt,) = _checkpoints(repo)
    at = _iteration(ckpt)
    lr = LR

    # its own lr: starts over, says which key changed, keeps the interrupted state
    out = run(["dvc", "exp", "run", "train_fcn32s", "-S", f"train.fcn32s.lr={lr * 2}"], repo).stdout
    assert f"not resuming the interrupted run in {ckpt.parent}" in out, out
    assert f"train.fcn32s.lr: {lr} -> {lr * 2}" in out, out
    assert "resuming from" not in out and ckpt.exists()

    # another stage's lr, the loader workers and the checkpoint cadence, in a queued
    # experiment (a temporary copy under .dvc/tmp/exps): resumes the interrupted run
    edits = {
        "train.fcn32s.lr": lr,
        "train.fcn8s.lr": lr * 3,
        "train.workers": 1,
        "train.checkpoint_every": 3,
        "train.checkpoint_minutes": 5,
    }
    sets = [a for k, v in edits.items() for a in ("-S", f"{k}={v}")]
    run(["dvc", "exp", "run", "--queue", "train_fcn32s", *sets], repo)
    out = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, timeout=TIMEOUT_S).stdout
    assert f"[train] fcn32s: resuming from {ckpt} at iteration {at}" in out, out
    assert not ckpt.exists()


# --- the stage command itself ------------------------------------------------------------------


def _stage(repo: Path, name: str = "fcn32s") -> subprocess.CompletedProcess:
    e = env()
    e.pop("DVC_ROOT", None)
    e.pop("FCN_RESUME_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "stages.train", name, "--no-progress"],
        cwd=repo,
        env=e,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.mark.slow
def test_stop_between_last_checkpoint_and_model_file_finishes_without_training(
    prepared, reference, tmp_path
):
    """The run dies after its last end-of-epoch checkpoint, before the model file exists
    (here: the model path is a directory, so the write fails at exactly that point)."""
    repo = _clone(prepared, tmp_path / "edge")
    blocker = repo / "models" / "fcn32s.pt"
    blocker.mkdir(parents=True)
    (blocker / "keep").touch()
    first = _stage(repo)
    assert first.returncode != 0, first.stdout
    (ckpt,) = _checkpoints(repo)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2, state["epoch"]  # both epochs done
    done = state["iteration"]

    shutil.rmtree(blocker)
    again = _stage(repo)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert f"resuming from {ckpt} at iteration {done}" in out, out
    assert f"{done} iterations (0 in this run)" in out and "epoch 1/2" not in out, out
    assert "val mean IoU" in out, out  # the saved scores, no KeyError
    assert not _checkpoints(repo)
    ref = reference
    assert same_weights(repo / "models" / "fcn32s.pt", ref / "models" / "fcn32s.pt")
    assert live_curves(repo, "fcn32s") == live_curves(ref, "fcn32s")


@pytest.mark.slow
def test_a_second_run_of_the_same_stage_is_refused_naming_the_holder(prepared, tmp_path):
    repo = _clone(prepared, tmp_path / "busy")
    cfg = load_params(repo / "params.yaml")
    data = repo / "data" / "preprocessed"
    inputs = RunInputs.of_stage(
        "fcn32s",
        cfg,
        init_path=repo / "data" / "raw" / "vgg16" / "vgg16.pth",
        train_dir=data / "train",
        val_dir=data / "val",
        dvc_yaml=repo / "dvc.yaml",
    )
    store = ResumeStore(repo.resolve() / ".fcn-resume" / "fcn32s", inputs)
    with store.lock():  # this test process is "the first run"
        p = _stage(repo)
    assert p.returncode == 3, p.stdout + p.stderr
    assert f"train_fcn32s is already running in process {os.getpid()}" in p.stderr, p.stderr
    assert not (repo / "models" / "fcn32s.pt").exists() and not _checkpoints(repo)


# --- the parts, without dvc ------------------------------------------------------------------


def test_resume_root_is_the_main_repository_even_from_a_queued_copy(tmp_path):
    main = tmp_path / "repo"
    queued = main / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    queued.mkdir(parents=True)
    assert resume_root(main, {}) == main.resolve() / ".fcn-resume"
    assert resume_root(queued, {}) == main.resolve() / ".fcn-resume"
    # what DVC sets for stage commands, the queue's included: the main repository
    assert resume_root(queued, {"DVC_ROOT": str(main)}) == main.resolve() / ".fcn-resume"
    other = tmp_path / "big-disk"
    assert resume_root(queued, {"FCN_RESUME_DIR": str(other)}) == other.resolve()


def _inputs(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> RunInputs:
    params = tiny_params()
    if edit is not None:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    for split in ("train", "val"):
        index = tmp_path / split / INDEX_NAME
        if not index.exists():
            index.parent.mkdir()
            index.write_text(json.dumps({"split": split}))
    return RunInputs.of_stage(
        "fcn32s",
        load_params(path),
        init_path=None,
        train_dir=tmp_path / "train",
        val_dir=tmp_path / "val",
    )


def test_fingerprint_is_the_stage_declared_params_plus_init_and_data(tmp_path):
    keys = declared_params("train_fcn32s")
    assert "train.fcn32s" in keys and "train.workers" not in keys
    base = _inputs(tmp_path)
    lr = LR
    assert base.params["train.fcn32s.lr"] == lr and "train.fcn8s.lr" not in base.params

    def same(edit: Callable[[dict[str, Any]], None]) -> bool:
        return _inputs(tmp_path, edit).fingerprint() == base.fingerprint()

    t = "train"
    assert same(lambda p: p[t]["fcn8s"].update(lr=0.5))
    assert same(lambda p: p[t].update(workers=7))
    assert same(lambda p: p[t].update(checkpoint_every=3, checkpoint_minutes=0.5))
    assert not same(lambda p: p["model"].update(width=0.25))
    changed = _inputs(tmp_path, lambda p: p[t]["fcn32s"].update(lr=2 * lr))
    assert changed.differences(base) == [f"train.fcn32s.lr: {lr} -> {2 * lr}"]
    (tmp_path / "train" / INDEX_NAME).write_text("{}")  # other data
    assert _inputs(tmp_path).differences(base) == [
        "the train data (data/preprocessed/train changed)"
    ]


def test_checkpoint_cadence_counts_iterations_and_wall_time():
    now = [0.0]
    cadence = CheckpointCadence(50, 10.0, clock=lambda: now[0])
    assert cadence.due_by_iteration(50) and not cadence.due_by_iteration(49)
    now[0] = 599.0
    assert not cadence.due_by_time()
    now[0] = 600.0
    assert cadence.due_by_time()
    cadence.saved()
    assert not cadence.due_by_time()
    assert not CheckpointCadence(50, None, clock=lambda: 1e9).due_by_time()


def test_lock_names_its_holder_and_frees_when_it_dies(tmp_path):
    lock = tmp_path / "fcn32s.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.training.distributed import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1]), 'x'):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(lock),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                StageBusyError, match=f"train_fcn32s is already running in process {holder.pid}"
            ),
            exclusive_lock(lock, "train_fcn32s"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "train_fcn32s"):  # SIGKILL released it
        assert lock.read_text().strip() == str(os.getpid())
