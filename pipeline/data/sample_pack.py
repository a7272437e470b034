"""Deterministic files of the offline sample: JPEG/PNG encoders and tar/zip writers.

Archive members have fixed times, owners, modes and order, so identical contents give
byte-identical archives (their hashes are pinned in dvc.lock).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_path
from pipeline.classes import voc_palette_flat

VOC_MTIME = 1336694400  # 2012-05-11, the VOC2012 trainval release


COCO_ZIP_TIME = (2017, 9, 1, 0, 0, 0)


JPEG_QUALITY = 90


def encode_jpeg(img: Image.Image) -> bytes:
    """JPEG bytes of `img` at `JPEG_QUALITY` (PIL's encoder, default 4:2:0 subsampling)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_voc_label_png(label: np.ndarray) -> bytes:
    """Mode-P PNG with the full 256-entry VOC palette, as in SegmentationClass."""
    im = Image.frombytes(
        "P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes()
    )
    im.putpalette(voc_palette_flat())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def add_tar_members(tar: tarfile.TarFile, files: dict[str, bytes], mtime: int) -> int:
    """Add `files` (member name -> bytes) to `tar` with their parent directory entries, sorted,
    time `mtime`, owner 0 and fixed modes: identical archive bytes for identical `files`.
    Returns the number of entries written."""
    dirs: set[str] = set()
    for n in files:
        parts = Path(n).parts[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    entries = sorted([(d + "/", None) for d in dirs] + list(files.items()))
    for name, data in entries:
        info = tarfile.TarInfo(name.rstrip("/"))
        info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
        if data is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return len(entries)


def write_voc_tar(path: Path, files: dict[str, bytes]) -> int:
    """Uncompressed GNU tar with parent directory entries, sorted members, fixed metadata."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        return add_tar_members(tar, files, VOC_MTIME)


def write_coco_zip(path: Path, files: dict[str, bytes], *, deflate: bool) -> int:
    """Zip with its top-level directory entry, sorted members and fixed timestamps."""
    dirs = sorted({n.split("/")[0] + "/" for n in files})
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for d in dirs:
            info = zipfile.ZipInfo(d, date_time=COCO_ZIP_TIME)
            info.create_system, info.external_attr = 3, (0o40755 << 16) | 0x10
            zf.writestr(info, b"")
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=COCO_ZIP_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(info, files[name])
    return len(dirs) + len(files)
