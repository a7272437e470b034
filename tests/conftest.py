"""Shared fixtures: where the real data is, CI strictness, seeded RNGs, an HTTP server.

The real VOC/COCO samples (tests marked `real_data`) are found through one chain:

1. the folder named by the environment variable `FCN_SHARED_DATA`, when it is set;
2. otherwise `../shared/data` beside the checkout;
3. otherwise those tests are skipped, with a reason that says how to get the data.

In CI (`CI=true`, or `FCN_REQUIRE_ALL_TESTS=1`, which `.ci/run` sets) nothing may be skipped for
a missing data set or a missing `sshd`: the same tests fail instead.
"""

from __future__ import annotations

import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REQUIRE_ALL, FileServer, skip_or_fail
from tests.sshd import SSHDError, SSHServer, find_sshd, running_sshd

REPO = Path(__file__).resolve().parents[1]
VOC_DIR, COCO_DIR = "voc2012-sample", "coco2017-sample"


def _data_candidate() -> tuple[Path, str]:
    """The folder the chain picks and how it was picked (an explicit setting is never skipped
    over: a wrong FCN_SHARED_DATA is reported, not silently replaced by ../shared/data)."""
    env = os.environ.get("FCN_SHARED_DATA")
    if env:
        return Path(env).expanduser(), "FCN_SHARED_DATA"
    return REPO.parent / "shared" / "data", "../shared/data beside the checkout"


SHARED_DATA, SHARED_DATA_FROM = _data_candidate()
HOW_TO_GET_DATA = (
    f"set FCN_SHARED_DATA to a folder with {VOC_DIR}/ and {COCO_DIR}/ "
    "(the real VOC 2012 / COCO 2017 samples; layout: README, 'Tests and the real data'), "
    "or place that folder at ../shared/data beside the checkout"
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs the real samples `real_data` (`pytest -m real_data`), and
    group the tests for pytest-xdist (`--dist loadgroup`, pyproject.toml), each group run whole
    by one worker: every other test with the rest of its module, so that a module-scoped fixture
    (a pipeline run, shard dirs) is built once. The readers of the session's sample run come
    early, in two groups (the team workflows first, the others after one module), so that the
    two workers share one sample run (`sample_run`) without one waiting for the other to build
    it; the other modules with more slow tests first (pyproject.toml's `--no-loadscope-reorder`
    keeps this order)."""
    readers: dict[str, list[pytest.Item]] = {"sample_run:team": [], "sample_run": []}
    rest = []
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_data" in names:
            item.add_marker(pytest.mark.real_data)
        module = _module(item)
        if "sample_run" in names:
            group = "sample_run:team" if module.endswith("test_team.py") else "sample_run"
            readers[group].append(item)
        else:
            group = module
            rest.append(item)
        item.add_marker(pytest.mark.xdist_group(group))
    # then the modules with the most slow tests first: a long module last would leave one
    # worker running it alone at the end
    slow = Counter(_module(i) for i in rest if i.get_closest_marker("slow"))
    order = {m: n for n, m in enumerate(dict.fromkeys(_module(i) for i in rest))}
    rest.sort(key=lambda i: (-slow[_module(i)], order[_module(i)]))
    # the second worker starts on the first of them while the first worker reproduces the
    # sample run for the team workflows; the other readers come next, when the run is there
    n_head = sum(1 for i in rest if _module(i) == _module(rest[0])) if rest else 0
    items[:] = [*readers["sample_run:team"], *rest[:n_head], *readers["sample_run"], *rest[n_head:]]


def _module(item: pytest.Item) -> str:
    """The test file of a collected test (`tests/test_x.py`)."""
    return item.nodeid.split("::")[0]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores (on 2 cores and `-n 2`: one
    intra-op thread), in the worker and in every process it starts (dvc stages, trainers):
    otherwise each worker's torch takes every core and the workers fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line for the skipped real-data group: how many, and how to run them."""
    skipped = terminalreporter.stats.get("skipped", [])
    n = sum(1 for r in skipped if "real_data" in getattr(r, "keywords", {}))
    if n:
        terminalreporter.write_line(
            f"real_data: {n} test(s) skipped, no real VOC/COCO samples at {SHARED_DATA} "
            f"(from {SHARED_DATA_FROM}); to run them: {HOW_TO_GET_DATA}"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line saying where the real data comes from and whether skips are allowed."""
    found = all((SHARED_DATA / d).is_dir() for d in (VOC_DIR, COCO_DIR))
    state = "found" if found else "MISSING: real_data tests skip" + (" (fail: CI)" * REQUIRE_ALL)
    return [f"real data: {SHARED_DATA} (from {SHARED_DATA_FROM}): {state}"]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout under test."""
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with the real samples; skips (fails in CI) when the chain finds none."""
    missing = [d for d in (VOC_DIR, COCO_DIR) if not (SHARED_DATA / d).is_dir()]
    if missing:
        skip_or_fail(
            f"real VOC/COCO samples not found ({SHARED_DATA_FROM}: {SHARED_DATA} lacks "
            f"{', '.join(m + '/' for m in missing)}): {HOW_TO_GET_DATA}"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def voc_sample(shared_data: Path) -> Path:
    """The VOC2012 directory of the real sample (JPEGImages, SegmentationClass, ImageSets)."""
    return shared_data / VOC_DIR / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="session")
def coco_sample(shared_data: Path) -> Path:
    """The real COCO 2017 val sample: annotations/instances_val2017.json, images/val2017/*.jpg."""
    return shared_data / COCO_DIR


@pytest.fixture(scope="session")
def generated_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC2012 directory like `voc_sample`'s, from the project's own seeded generator.

    For tests that need "some VOC-like photo", not the real data: 6 train and 3 val images of
    160-320 px with SegmentationClass PNGs and ImageSets lists, always available.
    """
    from pipeline.data.sample import VOC_ROOT, make_voc_sample

    root = tmp_path_factory.mktemp("generated_voc")
    tar = root / "VOCtrainval_11-May-2012.tar"
    make_voc_sample(tar, seed=0, n_train=6, n_val=3, min_side=160, max_side=320)
    with tarfile.open(tar) as tf:
        tf.extractall(root, filter="data")
    return root / VOC_ROOT


@pytest.fixture(scope="session")
def shards(voc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny shard dirs of real VOC images, shared by the training tests (each test copies or
    only reads them): `small` 8 train images and `val` 4 val images at 64 px (the
    loop-equivalence tests: resume, DDP, accumulation, checkpoints), `square` the 8 train images
    centre-cropped square, whole image = one crop (the overfit and transplant tests)."""
    from tests.repo_utils import voc_ids, write_voc_shards

    root = tmp_path_factory.mktemp("shards")
    train_ids, val_ids = voc_ids(voc_sample, "train"), voc_ids(voc_sample, "val")
    return {
        "small": write_voc_shards(voc_sample, train_ids[:8], root / "small", 64, square=False),
        "val": write_voc_shards(voc_sample, val_ids[:4], root / "val", 64, square=False),
        "square": write_voc_shards(voc_sample, train_ids[:8], root / "square", 64, square=True),
    }


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project copied, set to the test profile (`repo_utils.TINY_SAMPLE`), reproduced and
    committed once per test run: (repo, dvc repro's output). Read-only: a test that changes it
    works on a copy (`shutil.copytree(repo, dst, symlinks=True)` keeps git history, outputs and
    DVC cache).

    Under pytest-xdist the workers share one run: the first worker that needs it reproduces it
    in the run's common temp folder while holding a lock, the others wait for it and read it."""
    import fcntl
    import json

    from tests.repo_utils import copy_repo, run, write_tiny_params

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's basetemp is in
    shared = root / "sample_run"
    result = root / "sample_run.json"
    with open(root / "sample_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            try:
                repo = copy_repo(shared / "repo")
                write_tiny_params(repo / "params.yaml")
                run(["git", "commit", "-qam", "small sample for tests"], repo)
                out = run(["dvc", "repro"], repo, timeout=1200)
                run(["git", "add", "-A"], repo)
                run(["git", "commit", "-qm", "first run"], repo)
                done = {"error": None, "out": out.stdout + out.stderr}
            except Exception as e:
                done = {"error": f"{type(e).__name__}: {e}", "out": ""}
            result.write_text(json.dumps(done))
    done = json.loads(result.read_text())
    if done["error"]:
        pytest.fail(f"the session's sample run failed: {done['error']}", pytrace=False)
    return shared / "repo", done["out"]


@pytest.fixture(autouse=True)
def seeded_rngs() -> None:
    """Every test starts from the same global RNG states, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small images: intra-op threads only fight over the 2 shared cores (10-20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sshd_server(tmp_path: Path) -> Iterator[SSHServer]:
    """A running OpenSSH server on 127.0.0.1 (tests/sshd.py). Not installed: a skip, except in
    CI (which installs openssh-server), where it fails like an sshd that does not come up."""
    try:
        find_sshd()
    except SSHDError as e:
        skip_or_fail(f"no OpenSSH server here: {e}")
    try:
        with running_sshd(tmp_path) as server:
            yield server
    except SSHDError as e:
        pytest.fail(f"cannot start the test OpenSSH server: {e}", pytrace=False)


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    """A `FileServer` on 127.0.0.1, shut down after the test."""
    srv = FileServer()
    yield srv
    srv.close()
