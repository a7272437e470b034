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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs the real samples `real_data` (`pytest -m real_data`)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


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
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project copied, set to FAST_SAMPLE, reproduced and committed once per session:
    (repo, dvc repro's output). Read-only: a test that changes it works on a copy
    (`shutil.copytree(repo, dst, symlinks=True)` keeps git history, outputs and DVC cache)."""
    from tests.repo_utils import FAST_SAMPLE, copy_repo, run, set_params

    repo = copy_repo(tmp_path_factory.mktemp("run") / "repo")
    set_params(repo, FAST_SAMPLE)
    run(["git", "commit", "-qam", "small sample for tests"], repo)
    out = run(["dvc", "repro"], repo, timeout=1200)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    return repo, out.stdout + out.stderr


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
