"""SBD support (pipeline/data/sbd.py): the real archive layout written, served over HTTP, downloaded
with the pinned checksum and read back; truncated, corrupt and incomplete archives; the sample."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.data.download import fetch
from pipeline.data.download_verify import DownloadError
from pipeline.data.sbd import (
    SBD_ROOT,
    SBD_SPLITS,
    SbdError,
    make_sbd_sample,
    read_cls_mat,
    read_sbd,
    write_sbd_tgz,
)

IDS = ["2008_000002", "2008_000003", "2008_000007", "2009_000012", "2010_001234", "2011_003001"]
TRAIN, VAL = IDS[:4], IDS[4:]


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _dataset() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Six small JPEGs of different sizes; labels with background and 1-3 classes each."""
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for k, image_id in enumerate(IDS):
        h, w = 24 + 4 * k, 40 - 2 * k
        images[image_id] = _jpeg(rng, h, w)
        label = np.zeros((h, w), np.uint8)
        for c in rng.choice(np.arange(1, 21), 1 + k % 3, replace=False):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            label[y : y + 8, x : x + 8] = c
        labels[image_id] = label
    return images, labels


def _tar_members(tgz: Path) -> dict[str, bytes]:
    with tarfile.open(tgz, "r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _rewrite(src: Path, dst: Path, order: list[str] | None = None, **changes: bytes | None) -> Path:
    """Copy a tgz's files into a new tgz (plain tarfile), in `order` (default: as in `src`);
    `changes` maps a key, `<folder>__<id>` or `<split>`, to new bytes or None
    (drop it)."""
    files = _tar_members(src)
    for key, data in changes.items():
        folder, _, image_id = key.partition("__")
        name = f"{SBD_ROOT}/{folder}/{image_id}." + ("jpg" if folder == "img" else "mat")
        if not image_id:
            name = f"{SBD_ROOT}/{folder}.txt"
        assert name in files, name
        if data is None:
            del files[name]
        else:
            files[name] = data
    with tarfile.open(dst, "w:gz") as tf:
        for name in order or list(files):
            if name in files:
                info = tarfile.TarInfo(name)
                info.size = len(files[name])
                tf.addfile(info, io.BytesIO(files[name]))
    return dst


@pytest.fixture
def sbd_tgz(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, np.ndarray]]:
    images, labels = _dataset()
    path = tmp_path / "benchmark.tgz"
    write_sbd_tgz(path, images, labels, {"train": TRAIN, "val": VAL})
    return path, images, labels


def _read(tgz: Path, split: str, exclude=()) -> list:
    return list(read_sbd(tgz, split, exclude))


def test_round_trip_over_http(tmp_path, http_server, sbd_tgz):
    src, images, labels = sbd_tgz
    data = src.read_bytes()
    http_server.files["/benchmark.tgz"] = data
    dest = tmp_path / "download" / "benchmark.tgz"
    md5 = hashlib.md5(data).hexdigest()
    fetch([http_server.url("/benchmark.tgz")], dest, md5=md5, size=len(data), progress=False)
    assert dest.read_bytes() == data
    assert http_server.hits("/benchmark.tgz")[0]["status"] == 200

    for split, ids in (("train", TRAIN), ("val", VAL)):
        records = _read(dest, split)
        assert [r.image_id for r in records] == ids
        for r in records:
            assert r.image_name == f"{SBD_ROOT}/img/{r.image_id}.jpg"
            assert r.label_name == f"{SBD_ROOT}/cls/{r.image_id}.mat"
            assert r.image == images[r.image_id]
            assert r.label.dtype == np.uint8 and r.label.flags.c_contiguous
            np.testing.assert_array_equal(r.label, labels[r.image_id])
            assert Image.open(io.BytesIO(r.image)).size == r.label.shape[::-1]

    excluded = [r.image_id for r in read_sbd(dest, "train", exclude={TRAIN[1], VAL[0]})]
    assert excluded == [TRAIN[0], *TRAIN[2:]]


def test_order_is_the_archives_and_lists_may_come_first(tmp_path, sbd_tgz):
    src, images, labels = sbd_tgz
    names = list(_tar_members(src))
    lists = [n for n in names if n.endswith(".txt")]
    imgs = sorted((n for n in names if "/img/" in n), reverse=True)
    rest = [n for n in names if n not in lists and n not in imgs]
    dst = _rewrite(src, tmp_path / "reordered.tgz", order=lists + imgs + rest)
    records = _read(dst, "train")
    assert [r.image_id for r in records] == TRAIN[::-1]  # the img/ members' order
    for r in records:
        assert r.image == images[r.image_id]
        np.testing.assert_array_equal(r.label, labels[r.image_id])


def test_mat_files_match_torchvisions_reader_and_scipys_writer(tmp_path, sbd_tgz):
    src, _, labels = sbd_tgz
    member = _tar_members(src)[f"{SBD_ROOT}/cls/{IDS[3]}.mat"]
    # torchvision.datasets.SBDataset's own expression
    tv = scipy.io.loadmat(io.BytesIO(member))["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(tv, labels[IDS[3]])
    present = scipy.io.loadmat(io.BytesIO(member))["GTcls"][0]["CategoriesPresent"][0]
    assert present.ravel().tolist() == sorted(set(np.unique(labels[IDS[3]]).tolist()) - {0})

    seg = np.zeros((7, 9), np.uint8)
    seg[2:5, 3:8] = 12
    seg[0, 0] = 20
    buf = io.BytesIO()
    cells = np.empty((20, 1), dtype=object)
    cells[:] = [[np.zeros((0, 0))] for _ in range(20)]
    gt = {"Boundaries": cells, "Segmentation": seg, "CategoriesPresent": np.array([[12], [20]])}
    scipy.io.savemat(buf, {"GTcls": gt})  # uncompressed, scipy's own header
    out = read_cls_mat(buf.getvalue(), "x.mat")
    assert out.dtype == np.uint8 and out.shape == (7, 9)
    np.testing.assert_array_equal(out, seg)


def _mat(obj: dict) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, obj)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x89PNG garbage" * 20, "not a readable MATLAB file"),
        (_mat({"GTinst": {"Segmentation": np.zeros((3, 3), np.uint8)}}), "no struct GTcls"),
        (_mat({"GTcls": {"Boundaries": np.zeros((1, 1))}}), "field Segmentation"),
        (_mat({"GTcls": {"Segmentation": np.zeros((2, 3, 4), np.uint8)}}), "2-D"),
        (_mat({"GTcls": {"Segmentation": np.full((3, 3), 0.5)}}), "dtype float64"),
        (_mat({"GTcls": {"Segmentation": np.array([[0, 21], [255, 3]], np.uint8)}}), "[21, 255]"),
    ],
    # ids from the messages: a .mat header holds its creation time, and test ids made from it
    # differ between pytest-xdist workers that collect a second apart ("different tests")
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_read_cls_mat_refuses(data, message):
    with pytest.raises(SbdError, match="^cls/x.mat: ") as e:
        read_cls_mat(data, "cls/x.mat")
    assert message in str(e.value)


def test_truncated_archive_and_its_download_are_refused(tmp_path, http_server, sbd_tgz):
    src, _, _ = sbd_tgz
    data = src.read_bytes()
    cut = tmp_path / "cut" / "benchmark.tgz"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    for split in SBD_SPLITS:
        with pytest.raises(SbdError, match="truncated or corrupt") as e:
            _read(cut, split)
        assert str(e.value).startswith(f"{cut}: ")
        assert str(e.value).endswith("delete it and download benchmark.tgz again")

    http_server.files["/benchmark.tgz"] = data[: len(data) // 2]
    dest = tmp_path / "download" / "benchmark.tgz"
    with pytest.raises(DownloadError):
        fetch(
            [http_server.url("/benchmark.tgz")],
            dest,
            md5=hashlib.md5(data).hexdigest(),
            size=len(data),
            retries=0,
            progress=False,
            partial_dir=tmp_path / "partial",
        )
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_corrupt_mat_member_is_named_before_any_record(tmp_path, sbd_tgz):
    src, _, _ = sbd_tgz
    bad = _rewrite(src, tmp_path / "bad.tgz", **{f"cls__{TRAIN[2]}": b"\x00garbage" * 50})
    records = read_sbd(bad, "train")
    with pytest.raises(SbdError) as e:
        next(records)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: {SBD_ROOT}/cls/{TRAIN[2]}.mat: not a readable MATLAB file")
    assert [r.image_id for r in read_sbd(bad, "val")] == VAL  # not wanted there: never parsed


def test_listed_id_without_members(tmp_path, sbd_tgz):
    src, _, _ = sbd_tgz
    bad = _rewrite(
        src, tmp_path / "bad.tgz", **{f"img__{TRAIN[1]}": None, f"cls__{TRAIN[3]}": None}
    )
    with pytest.raises(SbdError) as e:
        _read(bad, "train")
    msg = str(e.value)
    assert msg.startswith(f"{bad}: {SBD_ROOT}/train.txt names ids whose members are missing")
    assert "2 missing member(s)" in msg
    assert f"{SBD_ROOT}/img/{TRAIN[1]}.jpg" in msg and f"{SBD_ROOT}/cls/{TRAIN[3]}.mat" in msg
    # excluded ids need no members
    kept = _read(bad, "train", exclude={TRAIN[1], TRAIN[3]})
    assert [r.image_id for r in kept] == [TRAIN[0], TRAIN[2]]


def test_bad_lists_splits_and_member_names(tmp_path, sbd_tgz):
    src, _, _ = sbd_tgz
    with pytest.raises(SbdError, match=f"^{src}: .*unknown SBD split 'test'"):
        read_sbd(src, "test")
    junk = _rewrite(src, tmp_path / "junk.tgz", train=f"{TRAIN[0]}\n\n../etc/passwd\n".encode())
    with pytest.raises(SbdError, match=r"train.txt line 3: '\.\./etc/passwd' is not an image id"):
        _read(junk, "train")
    twice = _rewrite(src, tmp_path / "twice.tgz", val=f"{VAL[0]}\r\n{VAL[0]}\r\n".encode())
    with pytest.raises(SbdError, match=f"val.txt line 2: '{VAL[0]}' is listed twice"):
        _read(twice, "val")
    nolist = _rewrite(src, tmp_path / "nolist.tgz", val=None)
    with pytest.raises(SbdError, match=f"^{nolist}: no member {SBD_ROOT}/val.txt"):
        _read(nolist, "val")
    assert len(_read(nolist, "train")) == len(TRAIN)

    hostile = tmp_path / "hostile.tgz"
    with tarfile.open(src, "r:gz") as tf_in, tarfile.open(hostile, "w:gz") as tf_out:
        for m in tf_in.getmembers():
            tf_out.addfile(m, tf_in.extractfile(m) if m.isfile() else None)
        evil = tarfile.TarInfo("../evil.jpg")
        evil.size = 3
        tf_out.addfile(evil, io.BytesIO(b"abc"))
    with pytest.raises(SbdError, match=r"member '\.\./evil\.jpg' contains '\.\.'"):
        _read(hostile, "train")


def test_write_is_deterministic(tmp_path, sbd_tgz):
    src, images, labels = sbd_tgz
    again = tmp_path / "again" / "benchmark.tgz"
    write_sbd_tgz(again, dict(reversed(images.items())), labels, {"train": TRAIN, "val": VAL})
    assert again.read_bytes() == src.read_bytes()
    raw = src.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"  # gzip, mtime 0
    assert gzip.decompress(raw)[257:262] == b"ustar"  # a tar inside
    assert [p.name for p in again.parent.iterdir()] == ["benchmark.tgz"]  # no temporaries
    with pytest.raises(ValueError, match="without image/label"):
        write_sbd_tgz(tmp_path / "x.tgz", images, labels, {"train": [*TRAIN, "2012_000001"]})
    with pytest.raises(ValueError, match=r"values must be 0\.\.20"):
        write_sbd_tgz(tmp_path / "x.tgz", images, {**labels, IDS[0]: labels[IDS[0]] + 21}, {})
    assert not (tmp_path / "x.tgz").exists()


def test_sample_from_the_generated_voc_tar(tmp_path, generated_voc):
    voc_tar = generated_voc.parents[1] / "VOCtrainval_11-May-2012.tar"
    lists = generated_voc / "ImageSets" / "Segmentation"
    voc_train = (lists / "train.txt").read_text().split()
    voc_val = sorted((lists / "val.txt").read_text().split())
    out = tmp_path / "sbd" / "benchmark.tgz"
    summary = make_sbd_sample(voc_tar, out)

    half = (len(voc_val) + 1) // 2
    expected = {"train": sorted(voc_train + voc_val[:half]), "val": voc_val[half:]}
    assert summary == {
        "archive": str(out),
        "images": len(voc_train) + len(voc_val),
        "train": len(expected["train"]),
        "val": len(expected["val"]),
        "voc_val_in_train": half,
    }
    assert half >= 1 and expected["val"]  # SBD train overlaps VOC val; SBD val is not empty
    for split in SBD_SPLITS:
        records = _read(out, split)
        assert [r.image_id for r in records] == expected[split]
        for r in records:
            assert r.image == (generated_voc / "JPEGImages" / f"{r.image_id}.jpg").read_bytes()
            voc = np.asarray(Image.open(generated_voc / "SegmentationClass" / f"{r.image_id}.png"))
            assert (voc == 255).any() and not (r.label == 255).any()
            np.testing.assert_array_equal(r.label, np.where(voc == 255, 0, voc))

    again = tmp_path / "again.tgz"
    make_sbd_sample(voc_tar, again)
    assert again.read_bytes() == out.read_bytes()
