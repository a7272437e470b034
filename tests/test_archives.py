"""pipeline.data.archives on real-layout archives (built from the real samples) and hostile ones."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.data.archives import (
    ArchiveError,
    ZipReader,
    check_member_name,
    iter_tar_files,
    safe_extract,
)

PREFIX = "VOCdevkit/VOC2012"


@pytest.fixture(scope="module")
def voc_files(voc_sample: Path) -> dict[str, bytes]:
    return {
        f"{PREFIX}/{p.relative_to(voc_sample).as_posix()}": p.read_bytes()
        for p in sorted(voc_sample.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def voc_tar(tmp_path_factory, voc_sample: Path) -> Path:
    """The real sample packed like the official tar (directory entries, `./`-free names)."""
    path = tmp_path_factory.mktemp("voc") / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(voc_sample, arcname=PREFIX)  # recursive: directories and files, like GNU tar
    return path


@pytest.fixture(scope="module")
def coco_zip(tmp_path_factory, coco_sample: Path) -> tuple[Path, dict[str, bytes]]:
    files = {
        f"val2017/{p.name}": p.read_bytes()
        for p in sorted((coco_sample / "images" / "val2017").glob("*.jpg"))
    }
    files["annotations/instances_val2017.json"] = (
        coco_sample / "annotations" / "instances_val2017.json"
    ).read_bytes()
    path = tmp_path_factory.mktemp("coco") / "val2017.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path, files


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# --- member names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../evil", "a/../../evil", "/etc/passwd", "\\evil", "C:evil", "C:/x", "a\\..\\b", ""]
)
def test_check_member_name_refuses_escapes(name):
    with pytest.raises(ArchiveError, match="archive.tar"):
        check_member_name(name, "archive.tar")


def test_check_member_name_normalises():
    assert check_member_name("./VOCdevkit//VOC2012/./x.jpg", "a.tar") == "VOCdevkit/VOC2012/x.jpg"
    assert check_member_name("val2017/", "a.zip") == "val2017"


# --- tar -----------------------------------------------------------------------------------


def test_iter_tar_files_streams_the_real_layout(voc_tar, voc_files):
    got = dict(iter_tar_files(voc_tar))
    assert got == voc_files  # every regular file, byte for byte; directories skipped
    jpgs = list(iter_tar_files(voc_tar, wanted=lambda n: n.endswith(".jpg")))
    assert len(jpgs) == sum(n.endswith(".jpg") for n in voc_files) > 0
    names = [n for n, _ in jpgs]
    assert names == sorted(names)  # archive order, one pass


def test_iter_tar_files_reads_compressed_tar(tmp_path, voc_files):
    path = tmp_path / "voc.tar.gz"
    name = f"{PREFIX}/ImageSets/Segmentation/val.txt"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"./{name}")
        info.size = len(voc_files[name])
        tf.addfile(info, io.BytesIO(voc_files[name]))
    assert list(iter_tar_files(path)) == [(name, voc_files[name])]


@pytest.mark.parametrize(
    "hostile",
    [
        _info("../evil"),
        _info("ABSOLUTE"),  # replaced by an absolute path inside tmp_path below
        _info("VOCdevkit/link", tarfile.SYMTYPE, "../../evil"),
        _info("VOCdevkit/abslink", tarfile.SYMTYPE, "/etc/passwd"),
        _info("VOCdevkit/hard", tarfile.LNKTYPE, "../evil"),
        _info("VOCdevkit/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_hostile_tar_members_are_refused(tmp_path, hostile, voc_files):
    if hostile.name == "ABSOLUTE":
        hostile.name = str(tmp_path / "outside" / "evil")
    good = f"{PREFIX}/ImageSets/Segmentation/train.txt"
    arch = _tar(tmp_path / "bad.tar", (_info(good), voc_files[good]), (hostile, b"pwned"))
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match="bad.tar") as e:
        list(iter_tar_files(arch))
    assert hostile.name in str(e.value)
    with pytest.raises(ArchiveError, match="bad.tar"):
        safe_extract(arch, dest)
    assert not dest.exists()  # all or nothing: not even the good member
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]  # nothing outside
    assert not (tmp_path.parent / "evil").exists()


def test_safe_extract_tar(tmp_path, voc_tar, voc_files):
    dest = safe_extract(voc_tar, tmp_path / "out")
    for name, data in voc_files.items():
        assert (dest / name).read_bytes() == data
    train = f"{PREFIX}/ImageSets/Segmentation/train.txt"
    only = safe_extract(voc_tar, tmp_path / "one", members=[train])
    assert [p for p in only.rglob("*") if p.is_file()] == [only / train]
    with pytest.raises(ArchiveError, match="no member"):
        safe_extract(voc_tar, tmp_path / "none", members=["VOCdevkit/nope.txt"])
    assert not (tmp_path / "none").exists()


def test_internal_symlink_is_skipped_by_iteration(tmp_path):
    arch = _tar(
        tmp_path / "ok.tar",
        (_info("d/a.txt"), b"hello"),
        (_info("d/b.txt", tarfile.SYMTYPE, "a.txt"), b""),
    )
    assert list(iter_tar_files(arch)) == [("d/a.txt", b"hello")]


@pytest.mark.parametrize("where", ["in-data", "at-member-boundary", "in-header"])
def test_truncated_tar_is_reported(tmp_path, voc_tar, where):
    data = voc_tar.read_bytes()
    with tarfile.open(voc_tar) as tf:
        members = tf.getmembers()
    m = next(m for m in members if m.isfile() and m.size > 5000)
    cut = {
        "in-data": m.offset_data + m.size // 2,
        "at-member-boundary": m.offset,  # tarfile alone would end quietly here
        "in-header": m.offset + 100,
    }[where]
    bad = tmp_path / "VOCtrainval_11-May-2012.tar"
    bad.write_bytes(data[:cut])
    with pytest.raises(ArchiveError, match=f"{bad}: truncated or corrupt tar"):
        for _ in iter_tar_files(bad):
            pass
    with pytest.raises(ArchiveError, match="truncated or corrupt tar"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- zip -----------------------------------------------------------------------------------


def test_zip_reader_random_access(coco_zip):
    path, files = coco_zip
    with ZipReader(path) as zr:
        assert set(zr.names()) == set(files)
        for name in reversed(list(files)):  # any order: random access
            assert zr.read(name) == files[name]
        with zr.open("annotations/instances_val2017.json") as f:
            assert f.read() == files["annotations/instances_val2017.json"]
        assert "val2017/000000397133.jpg" in zr
        with pytest.raises(ArchiveError, match="no member 'val2017/nope.jpg'"):
            zr.read("val2017/nope.jpg")
        clone = pickle.loads(pickle.dumps(zr))  # what a DataLoader worker gets
        assert clone.read("val2017/000000397133.jpg") == files["val2017/000000397133.jpg"]
        clone.close()


def test_safe_extract_zip(tmp_path, coco_zip):
    path, files = coco_zip
    dest = safe_extract(path, tmp_path / "out", members=["annotations/instances_val2017.json"])
    assert [p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()] == [
        "annotations/instances_val2017.json"
    ]
    dest = safe_extract(path, tmp_path / "all")
    assert all((dest / n).read_bytes() == d for n, d in files.items())


def test_zip_with_dotdot_member_is_refused(tmp_path, coco_zip):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("val2017/ok.jpg", b"fine")
        zf.writestr("../evil", b"pwned")
    with pytest.raises(ArchiveError, match=r"evil.zip: member '\.\./evil'"):
        ZipReader(bad)
    with pytest.raises(ArchiveError, match="evil.zip"):
        safe_extract(bad, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]
    assert not (tmp_path.parent / "evil").exists()


def test_truncated_zip_is_reported(tmp_path, coco_zip):
    path, _ = coco_zip
    bad = tmp_path / "val2017.zip"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=f"{bad}: truncated or corrupt zip.*delete it"):
        ZipReader(bad)
    with pytest.raises(ArchiveError, match="truncated or corrupt zip"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_zip_member_is_reported(tmp_path, coco_sample):
    image = next((coco_sample / "images" / "val2017").glob("*.jpg"))
    path = tmp_path / "val2017.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.write(image, f"val2017/{image.name}")
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit inside the stored JPEG: the CRC must catch it
    path.write_bytes(bytes(data))
    zr = ZipReader(path)
    with pytest.raises(ArchiveError, match=f"{path}: .*member 'val2017/{image.name}'"):
        zr.read(f"val2017/{image.name}")
    zr.close()
