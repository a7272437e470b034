"""Faults and hostile files that the other test files do not already cover (RELIABILITY.md).

- kill -9 (real SIGKILL to `dvc repro` and its stage process) mid-conversion, mid-shard-write,
  mid-training and mid-evaluation; then `dvc repro` completes with the results of an
  uninterrupted run, and no partial output ever reaches the DVC cache or a remote;
- a disk that fills mid-write (a small tmpfs; RLIMIT_FSIZE where mounting is not allowed);
- training checkpoints and VGG16 weights that pickle code: refused, never run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.atomic import atomic_write_bytes
from pipeline.config import CASCADE
from pipeline.data.shards import ShardReader, ShardWriter
from pipeline.training.resume import load_checkpoint, save_checkpoint
from pipeline.training.start import build_initial_model
from tests.helpers import PlantedCode
from tests.repo_utils import (
    AFTER_EVALUATE,
    REPO,
    before_its_run,
    env,
    kill_group,
    live_members,
    md5_file,
    run,
    same_weights,
    stages_run,
    start_dvc,
    wait_for,
    write_tiny_params,
)

# --- kill -9 during `dvc repro` ------------------------------------------------------------------

# The test profile (repo_utils.TINY_SAMPLE): deterministic on CPU (fp32, no loader workers), and
# a checkpoint mid-epoch: the kill lands between two checkpoints of the first epoch (4
# iterations), so the resumed run has to skip half an epoch. The session's sample run of the
# same profile is the uninterrupted run it must end equal to.
STAGE_TIMEOUT_S = 300
DOWNLOADS = ("download_voc", "download_coco", "download_sbd", "download_vgg16")


# Put on PYTHONPATH as sitecustomize.py: every Python process of the run (dvc and the stages)
# loads it. The sample's COCO conversion and preprocessing take milliseconds, less than the
# test's polling can catch; a stage that creates the atomic temporary of an output named in
# FCN_FREEZE_AT stops itself right after, so the kill finds it mid-write whatever its speed.
FREEZE_AT_TEMPORARY = """
import os, signal, tempfile

_names = set(filter(None, os.environ.get("FCN_FREEZE_AT", "").split(",")))
if _names:
    _mkdtemp = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        path = _mkdtemp(suffix, prefix, dir)
        if prefix and prefix.strip(".") in _names:  # pipeline.atomic: prefix ".<name>."
            os.kill(os.getpid(), signal.SIGSTOP)
        return path

    tempfile.mkdtemp = mkdtemp
"""


def _start_repro(
    repo: Path, log: Path, started: list[subprocess.Popen], freeze_at: str | None = None
) -> subprocess.Popen:
    """`dvc repro` in a session of its own: killpg reaches dvc and the stage it runs. With
    `freeze_at` (an output directory's name), the stage writing it stops once its atomic
    temporary exists (FREEZE_AT_TEMPORARY)."""
    extra = None
    if freeze_at:
        hook = log.parent / "freeze-hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(FREEZE_AT_TEMPORARY)
        extra = {"PYTHONPATH": str(hook), "FCN_FREEZE_AT": freeze_at}
    proc = start_dvc(["dvc", "repro"], repo, log, extra_env=extra)
    started.append(proc)
    return proc


def _kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL to dvc and every stage process: nothing gets to clean up after itself."""
    assert live_members(proc.pid), "the run ended before the kill"
    kill_group(proc)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """The `dvc repro` runs a test starts; a failed test leaves none of them running."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            kill_group(proc)


def _new_temporary(parent: Path, name: str, before: set[Path]) -> Callable[[], bool]:
    """True once a new `.<name>.*.tmp` (an atomic output being written) exists in `parent`."""
    return lambda: bool(set(parent.glob(f".{name}.*.tmp")) - before)


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when absent: an atomic rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}"))


def _verified_objects(store: Path) -> dict[str, Path]:
    """Every object of a DVC 3 cache or local remote hashes to its name, and every directory
    manifest's files are present; returns {object name: path}."""
    root = store / "files" / "md5"
    objects = {}
    for p in root.rglob("*"):
        if p.is_file():
            name = p.parent.name + p.name
            assert md5_file(p) == name.removesuffix(".dir"), f"corrupt object {p}"
            objects[name] = p
    for name, p in objects.items():
        if name.endswith(".dir"):
            for entry in json.loads(p.read_text()):
                assert entry["md5"] in objects, f"{p}: {entry['relpath']} missing from {store}"
    return objects


def _assert_outputs_whole(repo: Path) -> None:
    """Whatever output exists after a kill is complete: shard dirs read to the last byte,
    directory outputs have all their parts, JSON and torch files load."""
    coco_voc, pre = repo / "data" / "coco_voc", repo / "data" / "preprocessed"
    shard_dirs = []
    if coco_voc.exists():
        assert (coco_voc / "report.json").is_file(), "data/coco_voc without its report"
        shard_dirs += [coco_voc / "train2017", coco_voc / "val2017"]
    if pre.exists():
        assert (pre / "report.json").is_file(), "data/preprocessed without its report"
        shard_dirs += [pre / "train", pre / "val"]
    for d in shard_dirs:
        reader = ShardReader(d)
        for i in range(len(reader)):
            reader[i]  # raises on a truncated shard
        reader.close()
    jsons = ("metrics/*.json", "dvclive/*/metrics.json", ".fcn-resume/*/*/inputs.json")
    for p in (p for pattern in jsons for p in repo.glob(pattern)):
        json.loads(p.read_text())
    for p in list(repo.glob("models/*.pt")) + list(repo.glob(".fcn-resume/*/*/last.pt")):
        torch.load(p, map_location="cpu", weights_only=True)


def _lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


@pytest.mark.slow
def test_kill_9_at_every_stage_then_repro_equals_an_uninterrupted_run(
    sample_run, tmp_path, started
):
    reference = sample_run[0]  # the uninterrupted run (read-only)
    # the same commit before its run; the downloads (no kill point among them) restored
    repo = before_its_run(reference, tmp_path / "killed", DOWNLOADS)
    logs = tmp_path / "logs"
    logs.mkdir()
    data = repo / "data"

    # 1. mid-conversion: the COCO->VOC stage is writing its shard directory
    proc = _start_repro(repo, log := logs / "1.log", started, freeze_at="coco_voc")
    wait_for(proc, log, _new_temporary(data, "coco_voc", set()), "coco_to_voc writes")
    _kill_9(proc)
    assert not (data / "coco_voc").exists()
    changed = _changed_stages(repo)
    assert "coco_to_voc" in changed and not changed & {"download_voc", "download_coco"}, changed
    _assert_outputs_whole(repo)

    # 2. mid-shard-write: preprocess is writing data/preprocessed (coco_to_voc reruns first)
    before = set(data.glob(".preprocessed.*.tmp"))
    proc = _start_repro(repo, log := logs / "2.log", started, freeze_at="preprocessed")
    wait_for(proc, log, _new_temporary(data, "preprocessed", before), "preprocess writes")
    _kill_9(proc)
    assert stages_run(log.read_text()) == ["coco_to_voc", "preprocess"], log.read_text()
    assert not list(data.glob(".coco_voc.*.tmp")), "coco_to_voc left the killed run's temporary"
    assert not (data / "preprocessed").exists()
    assert "preprocess" in _changed_stages(repo) - {"coco_to_voc"}
    _assert_outputs_whole(repo)

    # 3. mid-training: right after FCN-32s saved its first checkpoint (iteration 2 of 8)
    resume = repo / ".fcn-resume" / "fcn32s"
    proc = _start_repro(repo, log := logs / "3.log", started)
    wait_for(proc, log, lambda: bool(list(resume.glob("*/last.pt"))), "the first checkpoint")
    _kill_9(proc)
    (ckpt,) = resume.glob("*/last.pt")
    ran = stages_run(log.read_text())
    assert ran == ["preprocess", "data_card", "train_fcn32s"], log.read_text()
    assert not (repo / "models" / "fcn32s.pt").exists()
    assert "train_fcn32s" in _changed_stages(repo) - {"preprocess"}
    _assert_outputs_whole(repo)

    # 4. mid-evaluation: FCN-32s is scored, FCN-16s and FCN-8s are not yet
    first_metrics = repo / "metrics" / "fcn32s.json"  # may be committed: wait for a new one
    old = _identity(first_metrics)
    proc = _start_repro(repo, log := logs / "4.log", started)
    wait_for(proc, log, lambda: _identity(first_metrics) not in (None, old), "new metrics")
    _kill_9(proc)
    out = log.read_text()
    assert f"[train] fcn32s: resuming from {ckpt} at iteration" in out, out
    assert not ckpt.exists(), "a completed run keeps no resume state"
    assert stages_run(out) == ["train_fcn32s", "train_fcn16s", "train_fcn8s", "evaluate"], out
    assert not (repo / "reports" / "summary.md").exists()
    # the stages after evaluate never ran in this repo: changed too, nothing else
    assert _changed_stages(repo) == {"evaluate", *AFTER_EVALUATE}
    _assert_outputs_whole(repo)

    # Each kill left the cache with whole objects only
    _verified_objects(repo / ".dvc" / "cache")

    # 5. `dvc repro` completes: only the killed evaluation runs again (and what follows it)
    out = run(["dvc", "repro"], repo, timeout=STAGE_TIMEOUT_S)
    assert stages_run(out.stdout) == ["evaluate", *AFTER_EVALUATE], out.stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert not list(data.glob(".*.tmp")), "a killed run's temporaries survived"

    # ...with the results of the uninterrupted run
    for name in CASCADE:
        got = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert got == json.loads((reference / "metrics" / f"{name}.json").read_text()), name
        model = f"models/{name}.pt"
        assert same_weights(repo / model, reference / model), f"{name} weights differ"
        got = json.loads((repo / "dvclive" / name / "metrics.json").read_text())
        assert got == json.loads((reference / "dvclive" / name / "metrics.json").read_text())
    assert (repo / "reports" / "summary.md").read_text() == (
        reference / "reports" / "summary.md"
    ).read_text()
    # the training curves too, point for point (the interrupted epoch's loss included)
    curves = sorted(p.relative_to(reference) for p in reference.glob("dvclive/*/plots/**/*.tsv"))
    assert len(curves) == 3 * 6, curves  # loss, lr, epoch, iteration, val mean IU and accuracy
    for curve in curves:
        assert (repo / curve).read_text() == (reference / curve).read_text(), curve
    # every data output is byte-identical, the generated VGG16 weights included
    ours, theirs = _lock_outs(repo), _lock_outs(reference)
    data_outs = [p for p in ours if p.startswith("data/")]
    assert len(data_outs) == 8 and all(ours[p] == theirs[p] for p in data_outs), (ours, theirs)

    # Nothing partial was ever cached: every object is also in the uninterrupted run's cache,
    # but for the model cards of inference_report, the one stage whose outputs are wall-clock
    # measurements (they differ run to run by design)
    cached = _verified_objects(repo / ".dvc" / "cache")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    timed = {o["md5"] for o in lock["inference_report"]["outs"]}
    extra = cached.keys() - _verified_objects(reference / ".dvc" / "cache").keys() - timed
    assert extra == set(), extra
    # ...nor pushed. `dvc push` sends every output's objects; the cache also holds copies of the
    # git-committed `cache: false` metrics and plots, which the run-cache keeps for restores
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    run(["dvc", "push"], repo)
    pushed = _verified_objects(tmp_path / "remote")
    assert pushed.keys() <= cached.keys()
    cached_outs = {p: h for p, h in _lock_outs(repo).items() if p.startswith(("data/", "models/"))}
    # 8 data outputs, 3 models, their 3 ONNX exports
    assert len(cached_outs) == 14 and set(cached_outs.values()) <= pushed.keys(), cached_outs
    in_git = {
        md5_file(p)
        for d in ("metrics", "plots", "dvclive")
        for p in (repo / d).rglob("*")
        if p.is_file()
    }
    unpushed = {k for k in cached.keys() - pushed.keys() if not k.endswith(".dir")}
    assert unpushed <= in_git, unpushed


# --- a disk that fills mid-write -----------------------------------------------------------------


class SmallDisk:
    """A 1 MiB tmpfs, or (where mounting is not permitted) a folder whose writers run under
    RLIMIT_FSIZE with SIGXFSZ ignored, so a write past the limit fails with EFBIG."""

    SIZE = 1 << 20

    def __init__(self, path: Path, mounted: bool) -> None:
        self.path, self.mounted = path, mounted
        self.limit = self.SIZE
        self.errnos = {errno.ENOSPC} if mounted else {errno.EFBIG}

    def leave_free(self, nbytes: int) -> None:
        """Fill the disk until about `nbytes` are left (or lower the file size limit to it)."""
        if not self.mounted:
            self.limit = nbytes
            return
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        (self.path / "filler").write_bytes(b"\0" * max(free - nbytes, 0))

    def files(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != "filler")

    def _apply_limit(self) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))

    def preexec(self) -> Callable[[], None] | None:
        return None if self.mounted else self._apply_limit

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """In-process writes under the limit (nothing to do on a real small disk)."""
        if self.mounted:
            yield
            return
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, old_limit[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = not os.environ.get("FCN_TEST_NO_TMPFS") and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SmallDisk.SIZE}", "tmpfs", str(mnt)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield SmallDisk(mnt, mounted)
    finally:
        if mounted and subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(small_disk):
    target = small_disk.path / "report.json"
    atomic_write_bytes(target, b'{"version": 1}\n')
    small_disk.leave_free(64 << 10)
    with small_disk.writing(), pytest.raises(OSError) as e:
        atomic_write_bytes(target, os.urandom(256 << 10))
    assert e.value.errno in small_disk.errnos, e.value
    assert str(target) in str(e.value)  # the message names the file
    assert target.read_bytes() == b'{"version": 1}\n'
    assert small_disk.files() == ["report.json"]  # no temporary left behind


def test_shard_writer_on_a_full_disk_leaves_no_directory(small_disk):
    small_disk.leave_free(64 << 10)
    out = small_disk.path / "train"
    with (
        small_disk.writing(),
        pytest.raises(OSError) as e,
        ShardWriter(out, shard_size=1000) as w,
    ):
        for i in range(256):  # 256 KiB in small records: the disk fills inside a flush
            w.add(f"voc/{i:06d}", {"image": os.urandom(1000)}, {"i": i})
    assert e.value.errno in small_disk.errnos, e.value
    assert not out.exists()
    assert str(small_disk.path) in str(e.value)  # the message names the shard file
    assert small_disk.files() == []  # no temporary directory left behind


def _write_checkpoint(path: Path, fp: str, n: int) -> None:
    save_checkpoint(path, {"fingerprint": fp, "model": {"w": torch.arange(n, dtype=torch.float32)}})


def test_checkpoint_on_a_full_disk_keeps_the_previous_checkpoint(small_disk):
    ckpt = small_disk.path / "fcn32s" / "last.pt"
    _write_checkpoint(ckpt, "fp", 1000)
    small_disk.leave_free(64 << 10)
    with small_disk.writing(), pytest.raises((OSError, RuntimeError)):  # torch raises RuntimeError
        _write_checkpoint(ckpt, "fp", 256 << 10)  # 1 MiB of weights
    state = load_checkpoint(ckpt, "fp")
    assert state is not None and torch.equal(state["model"]["w"], torch.arange(1000.0))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]


def test_preprocess_stage_on_a_full_disk_fails_and_leaves_nothing(small_disk, tmp_path):
    from pipeline.data.sample import make_voc_sample

    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    make_voc_sample(tar, seed=0, n_train=12, n_val=6, min_side=120, max_side=200)
    overrides = {"preprocess.use_coco": False, "preprocess.workers": 1}
    write_tiny_params(tmp_path / "params.yaml", overrides)
    out = small_disk.path / "preprocessed"
    small_disk.leave_free(32 << 10)
    args = ["--params", str(tmp_path / "params.yaml"), "--voc-tar", str(tar), "--no-progress"]
    cmd = [sys.executable, "-m", "stages.preprocess", *args, "--out", str(out)]
    p = subprocess.run(
        cmd, cwd=REPO, env=env(), capture_output=True, text=True, preexec_fn=small_disk.preexec()
    )
    assert p.returncode != 0
    assert os.strerror(next(iter(small_disk.errnos))) in p.stderr, p.stderr
    assert small_disk.files() == [], small_disk.files()  # no output, no temporaries
    # with room again, the same command succeeds
    (small_disk.path / "filler").unlink(missing_ok=True)
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(ShardReader(out / "val")) == 6 and small_disk.files() == ["preprocessed"]


# --- checkpoints and weights that pickle code ----------------------------------------------------


def test_pickle_bearing_checkpoint_is_refused_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoints" / "fcn32s" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"fingerprint": "fp", "model": {}, "epoch": PlantedCode(marker)}, ckpt)
    assert load_checkpoint(ckpt, "fp") is None  # training starts from scratch
    assert not marker.exists()
    out = capsys.readouterr().out
    assert (
        f"ignoring unreadable checkpoint {ckpt}" in out
        and "weights only" in out.lower().replace("_", " ")
    ), out


def test_torn_checkpoint_is_ignored(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    _write_checkpoint(ckpt, "fp", 4096)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # what a non-atomic writer leaves after kill -9
    assert load_checkpoint(ckpt, "fp") is None
    assert f"ignoring unreadable checkpoint {ckpt}" in capsys.readouterr().out


def test_pickle_bearing_vgg16_weights_are_refused_never_run(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(1), "x": PlantedCode(marker)}, weights)
    with pytest.raises(
        ValueError, match=f"{weights}: not a torch weights file that loads with weights_only=True"
    ):
        build_initial_model(
            "fcn32s",
            width=0.125,
            backbone_init="vgg16",
            vgg16_path=weights,
            init_from=None,
            seed=0,
        )
    assert not marker.exists()
