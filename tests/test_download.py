"""pipeline.data.download and stages/download.py against a real HTTP server on 127.0.0.1.

The server (`http_server`: tests.helpers.FileServer, Range support written there) serves
archives built from the real VOC/COCO samples and can misbehave on request: cut a response
short, stall, ignore Range, answer a wrong Content-Range, or fail with a status. It counts every
byte it sends.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.data.download import fetch
from pipeline.data.download_verify import DownloadError
from tests.repo_utils import profile_params, write_params, write_tiny_params


def _closed_port_url() -> str:
    with socket.socket() as s:  # bind, learn the port, close: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar"


# --- archives built from the real samples ----------------------------------------------------


@pytest.fixture(scope="module")
def voc_tar(voc_sample: Path) -> bytes:
    """A tar in the official layout (VOCdevkit/VOC2012/...) from the real sample files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for path in sorted(voc_sample.rglob("*")):
            if path.is_file():
                tf.add(path, arcname=f"VOCdevkit/VOC2012/{path.relative_to(voc_sample)}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco_zips(coco_sample: Path) -> dict[str, bytes]:
    """train2017.zip / val2017.zip / annotations_trainval2017.zip in the official layout."""
    images = sorted((coco_sample / "images" / "val2017").glob("*.jpg"))
    ann = (coco_sample / "annotations" / "instances_val2017.json").read_bytes()
    out = {}
    for split, chosen in (("train2017", images[:8]), ("val2017", images)):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for p in chosen:
                zf.write(p, f"{split}/{p.name}")
        out[f"{split}.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations/instances_val2017.json", ann)
        zf.writestr("annotations/instances_train2017.json", ann)
    out["annotations_trainval2017.zip"] = buf.getvalue()
    return out


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs if d.exists() for p in d.iterdir())


VOC = "/VOCtrainval_11-May-2012.tar"


# --- fetch over HTTP -------------------------------------------------------------------------


def test_full_download_md5_verified_with_progress(http_server, voc_tar, tmp_path, capsys):
    http_server.files[VOC] = voc_tar
    dest = tmp_path / "raw" / "VOCtrainval_11-May-2012.tar"
    out = fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), size=len(voc_tar), progress=True)
    assert out == dest and dest.read_bytes() == voc_tar
    assert [r["range"] for r in http_server.hits(VOC)] == [None]
    assert _leftovers(dest.parent) == [dest.name]  # no .part, no state file, no temp
    assert "B/s" in capsys.readouterr().err  # tqdm bar with a byte rate

    # a second call finds the verified file and sends no request
    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), progress=False)
    assert len(http_server.hits(VOC)) == 1
    with tarfile.open(dest) as tf:
        assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in tf.getnames()


def test_cut_connection_is_resumed_with_range(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    cut = len(voc_tar) // 3
    http_server.cut_after[VOC] = cut
    dest = tmp_path / "VOC.tar"
    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), retries=2, backoff=0.01, progress=False)
    assert dest.read_bytes() == voc_tar
    first, second = http_server.hits(VOC)
    assert first["sent"] == cut
    assert second["range"] == f"bytes={cut}-" and second["status"] == 206
    assert second["if_range"] is not None  # the ETag recorded when the download started
    assert second["sent"] == len(voc_tar) - cut < len(voc_tar)  # only the missing bytes
    assert http_server.sent(VOC) == len(voc_tar)


def test_partial_survives_a_failed_run_and_the_next_run_resumes(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    cut = len(voc_tar) // 2
    http_server.cut_after[VOC] = cut
    dest, partial = tmp_path / "raw" / "VOC.tar", tmp_path / "partial"
    with pytest.raises(DownloadError) as e:
        fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), retries=0, partial_dir=partial)
    assert "kept; re-running resumes it" in str(e.value)
    assert not dest.exists()
    assert (partial / "VOC.tar.part").stat().st_size == cut

    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), partial_dir=partial, progress=False)
    assert dest.read_bytes() == voc_tar
    assert http_server.hits(VOC)[1]["range"] == f"bytes={cut}-"
    assert http_server.sent(VOC) == len(voc_tar)
    assert _leftovers(partial) == []


def test_corrupt_partial_is_caught_and_downloaded_whole_once_more(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    cut = len(voc_tar) // 2
    http_server.cut_after[VOC] = cut
    dest, partial = tmp_path / "raw" / "VOC.tar", tmp_path / "partial"
    with pytest.raises(DownloadError):
        fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), retries=0, partial_dir=partial)
    part = partial / "VOC.tar.part"
    damaged = bytearray(part.read_bytes())
    damaged[1234] ^= 0xFF  # e.g. a crash that left garbage in the partial file
    part.write_bytes(bytes(damaged))

    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), partial_dir=partial, progress=False)
    assert dest.read_bytes() == voc_tar
    assert [r["range"] for r in http_server.hits(VOC)] == [None, f"bytes={cut}-", None]
    assert _leftovers(partial) == []


def test_server_ignoring_range_restarts_from_zero(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    http_server.cut_after[VOC] = 100_000
    http_server.ignore_range.add(VOC)
    dest = tmp_path / "VOC.tar"
    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), retries=1, backoff=0.01, progress=False)
    assert dest.read_bytes() == voc_tar
    second = http_server.hits(VOC)[1]
    assert second["range"] == "bytes=100000-" and second["status"] == 200  # whole file again


def test_wrong_content_range_restarts_from_zero(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    http_server.cut_after[VOC] = 100_000
    http_server.bad_content_range.add(VOC)  # answers 206 but claims the body starts at byte 0
    dest = tmp_path / "VOC.tar"
    fetch([http_server.url(VOC)], dest, md5=md5(voc_tar), retries=1, backoff=0.01, progress=False)
    assert dest.read_bytes() == voc_tar
    ranges = [r["range"] for r in http_server.hits(VOC)]
    assert ranges == [None, "bytes=100000-", None]  # the bad 206 body was not appended


def test_checksum_mismatch_leaves_nothing(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    dest, partial = tmp_path / "raw" / "VOC.tar", tmp_path / "partial"
    wrong = "0" * 32
    with pytest.raises(DownloadError) as e:
        fetch([http_server.url(VOC)], dest, md5=wrong, partial_dir=partial, progress=False)
    msg = str(e.value)
    assert str(dest) in msg and wrong in msg and md5(voc_tar) in msg
    assert not dest.exists()
    assert _leftovers(dest.parent, partial) == []  # the bad temp file is gone too


def test_sha256_prefix_is_checked(http_server, tmp_path):
    weights = os.urandom(300_000)
    http_server.files["/vgg16-397923af.pth"] = weights
    digest = hashlib.sha256(weights).hexdigest()
    dest = tmp_path / "vgg16.pth"
    url = http_server.url("/vgg16-397923af.pth")
    fetch([url], dest, sha256_prefix=digest[:8], size=len(weights), progress=False)
    assert dest.read_bytes() == weights
    dest.unlink()
    wrong = "397923af" if not digest.startswith("397923af") else "00000000"
    with pytest.raises(DownloadError, match=f"start with {wrong}, got {digest}"):
        fetch([url], dest, sha256_prefix=wrong, progress=False)
    assert not dest.exists()


def test_wrong_size_announced_is_refused_before_downloading(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    with pytest.raises(DownloadError, match=f"announces {len(voc_tar)} bytes, expected 123"):
        fetch([http_server.url(VOC)], tmp_path / "v.tar", size=123, progress=False)
    assert _leftovers(tmp_path) == []  # not a byte of the wrong file was written


def test_dead_mirrors_fall_through_to_the_next(http_server, voc_tar, tmp_path):
    http_server.files[VOC] = voc_tar
    sources = [_closed_port_url(), http_server.url("/missing.tar"), http_server.url(VOC)]
    dest = tmp_path / "VOC.tar"
    fetch(sources, dest, md5=md5(voc_tar), retries=2, backoff=0.01, progress=False)
    assert dest.read_bytes() == voc_tar
    assert len(http_server.hits("/missing.tar")) == 1  # a 404 is not retried


def test_every_source_failing_lists_each_with_its_reason(http_server, tmp_path):
    http_server.status["/busy.tar"] = 503
    sources = [
        _closed_port_url(),
        http_server.url("/missing.tar"),
        http_server.url("/busy.tar"),
        str(tmp_path / "nowhere.tar"),
    ]
    with pytest.raises(DownloadError) as e:
        fetch(sources, tmp_path / "VOC.tar", retries=1, backoff=0.01, progress=False)
    msg = str(e.value)
    lines = msg.splitlines()
    assert sources[0] in lines[1] and "cannot connect" in lines[1]
    assert sources[1] in lines[2] and "HTTP 404" in lines[2]
    assert sources[2] in lines[3] and "HTTP 503" in lines[3] and "2 attempt(s)" in lines[3]
    assert sources[3] in lines[4] and "no such file" in lines[4]
    assert "download.voc.urls" in msg  # says how to point params.yaml at a local copy


def test_retries_are_bounded_with_exponential_backoff(http_server, tmp_path):
    http_server.status["/busy.tar"] = 503
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match=r"gave up after 4 attempt\(s\)"):
        fetch(
            [http_server.url("/busy.tar")], tmp_path / "x", retries=3, backoff=0.05, progress=False
        )
    elapsed = time.perf_counter() - t0
    assert len(http_server.hits("/busy.tar")) == 4
    assert 0.05 + 0.1 + 0.2 <= elapsed < 10


def test_free_disk_space_is_checked_before_starting(http_server, tmp_path):
    http_server.files["/huge.bin"] = b"x"
    with pytest.raises(DownloadError, match="not enough free disk space"):
        fetch([http_server.url("/huge.bin")], tmp_path / "huge.bin", size=2**60, progress=False)
    assert http_server.requests == []


def test_unsupported_scheme_is_refused(tmp_path):
    with pytest.raises(DownloadError, match="scheme 'ftp' is not supported"):
        fetch(["ftp://example.org/VOC.tar"], tmp_path / "VOC.tar", progress=False)
    with pytest.raises(DownloadError, match="no source given"):
        fetch([], tmp_path / "VOC.tar", progress=False)
    with pytest.raises(ValueError, match="VOC.tar: md5 must be 32 hex digits"):
        fetch(["http://127.0.0.1:1/x"], tmp_path / "VOC.tar", md5="6cd6e144", progress=False)


# --- local sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_local_source_is_hardlinked_and_verified(voc_tar, tmp_path, as_url):
    src = tmp_path / "cluster" / "VOCtrainval_11-May-2012.tar"
    src.parent.mkdir()
    src.write_bytes(voc_tar)
    dest = tmp_path / "raw" / "VOC.tar"
    source = src.as_uri() if as_url else str(src)
    fetch([source], dest, md5=md5(voc_tar), size=len(voc_tar), progress=False)
    assert dest.stat().st_ino == src.stat().st_ino  # same inode: nothing copied
    assert dest.read_bytes() == voc_tar

    dest.unlink()
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch([source], dest, md5="f" * 32, progress=False)
    assert not dest.exists() and src.read_bytes() == voc_tar  # the source is untouched
    assert _leftovers(dest.parent) == []


def test_local_source_on_another_filesystem_is_copied(voc_tar, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to force a copy")
    src = shm / f"fcn-test-{os.getpid()}.tar"
    src.write_bytes(voc_tar)
    try:
        dest = tmp_path / "VOC.tar"
        fetch([str(src)], dest, md5=md5(voc_tar), progress=False)
        assert dest.read_bytes() == voc_tar and dest.stat().st_ino != src.stat().st_ino
    finally:
        src.unlink()


# --- the stage -------------------------------------------------------------------------------


STAGE = Path(__file__).resolve().parents[1] / "stages" / "download.py"


def _full_params(repo_root: Path, workdir: Path, **sources: dict) -> Path:
    params = profile_params("full")
    for key, source in sources.items():  # keep the keys a test does not set (e.g. pretrain)
        params["download"][key].update(source)
    params["download"]["retries"] = 1
    return write_params(workdir / "params.yaml", params)


def _stage(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(STAGE), *args, "--no-progress"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_stage_help():
    out = subprocess.run([sys.executable, str(STAGE), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "data/partial" in out.stdout and "vgg16" in out.stdout


@pytest.mark.slow
def test_stage_resumes_after_kill_9(http_server, voc_tar, tmp_path, repo_root):
    """A killed stage leaves its partial in data/partial/ and the next run resumes it."""
    http_server.files[VOC] = voc_tar
    stall = len(voc_tar) // 2
    http_server.stall_after[VOC] = stall
    voc = {"urls": [http_server.url(VOC)], "md5": md5(voc_tar), "size": len(voc_tar)}
    _full_params(repo_root, tmp_path, voc=voc)
    part = tmp_path / "data" / "partial" / "VOCtrainval_11-May-2012.tar.part"

    proc = _stage(tmp_path, "voc")
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= stall) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.communicate()
    assert part.stat().st_size == stall
    out = tmp_path / "data" / "raw" / "voc" / "VOCtrainval_11-May-2012.tar"
    assert not out.exists()

    http_server.release.set()
    proc = _stage(tmp_path, "voc")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.read_bytes() == voc_tar
    second = http_server.hits(VOC)[1]
    assert second["range"] == f"bytes={stall}-" and second["sent"] == len(voc_tar) - stall
    assert _leftovers(part.parent) == []


@pytest.mark.slow
def test_stage_fetches_coco_and_vgg16(http_server, coco_zips, tmp_path, repo_root):
    for name, data in coco_zips.items():
        http_server.files[f"/{name}"] = data
    weights = os.urandom(100_000)
    local = tmp_path / "shared" / "vgg16-xxxx.pth"
    local.parent.mkdir()
    local.write_bytes(weights)
    sources = {
        key: {"urls": [http_server.url(f"/{name}")], "md5": md5(coco_zips[name]), "size": None}
        for key, name in (
            ("coco_train", "train2017.zip"),
            ("coco_val", "val2017.zip"),
            ("coco_annotations", "annotations_trainval2017.zip"),
        )
    }
    prefix = hashlib.sha256(weights).hexdigest()[:8]
    vgg = {"urls": [_closed_port_url(), local.as_uri()], "sha256_prefix": prefix, "size": None}
    _full_params(repo_root, tmp_path, vgg16=vgg, **sources)

    for target in ("coco", "vgg16"):
        proc = _stage(tmp_path, target)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    raw = tmp_path / "data" / "raw"
    for name, data in coco_zips.items():
        assert (raw / "coco" / name).read_bytes() == data
    assert (raw / "vgg16" / "vgg16.pth").stat().st_ino == local.stat().st_ino


def test_stage_reports_failures_with_the_params_key(tmp_path, repo_root):
    vgg = {"urls": [str(tmp_path / "nowhere.pth")], "sha256_prefix": "397923af", "size": None}
    _full_params(repo_root, tmp_path, vgg16=vgg)
    proc = _stage(tmp_path, "vgg16")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "nowhere.pth: no such file" in err and "download.vgg16.urls" in err
    assert not (tmp_path / "data" / "raw" / "vgg16" / "vgg16.pth").exists()


@pytest.mark.slow
def test_stage_generates_the_offline_sample(tmp_path, repo_root):
    """`generate_sample: true` (the sample profile): archives in the real layout, no network."""
    # the test suite's sample, its backbone's pretraining shortened further: this test is about
    # the stage and its outputs
    write_tiny_params(
        tmp_path / "params.yaml",
        {
            "download.vgg16.pretrain.train_per_class": 2,
            "download.vgg16.pretrain.val_per_class": 1,
        },
    )
    for target in ("voc", "coco", "vgg16"):
        proc = _stage(tmp_path, target)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    raw = tmp_path / "data" / "raw"
    from pipeline.data.archives import ZipReader, iter_tar_files

    names = [n for n, _ in iter_tar_files(raw / "voc" / "VOCtrainval_11-May-2012.tar")]
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in names
    with ZipReader(raw / "coco" / "annotations_trainval2017.zip") as zr:
        assert "annotations/instances_val2017.json" in zr
    import torch

    state = torch.load(raw / "vgg16" / "vgg16.pth", weights_only=True)
    assert "features.0.weight" in state and "classifier.6.weight" in state
    report = json.loads((tmp_path / "reports" / "vgg16.json").read_text())
    assert report["train_crops"] == 2 * 21 and 0.0 <= report["val_top1"] <= 1.0
