"""What a download must be and how it is put in place: the pin, hashing, local copies, disk.

`Pin` holds the expected md5 / sha256 prefix / size; `Pin.mismatch` is checked BEFORE a file is
renamed onto its destination, so the destination is either right or absent. A local source is
hardlinked into place when it is on the same filesystem (nothing copied twice), else copied
while hashing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.atomic import atomic_path, fsync_dir

CHUNK = 1 << 20  # bytes per read: large enough for ~GB/s, small enough for flat memory


class DownloadError(RuntimeError):
    """No source delivered the pinned file; the message lists every source and why it failed."""


class SourceFailed(Exception):
    """This source cannot deliver the file (404, wrong size, checksum mismatch): try the next."""


@dataclass(frozen=True)
class Pin:
    """The expected identity of a file: any of md5, sha256 prefix and size (None = unchecked)."""

    md5: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None

    def new_hashers(self) -> dict[str, Any]:
        """Fresh hashlib objects for the digests the pin checks: {"md5", "sha256"} keys."""
        hashers: dict[str, Any] = {}
        if self.md5:
            hashers["md5"] = hashlib.md5(usedforsecurity=False)
        if self.sha256_prefix:
            hashers["sha256"] = hashlib.sha256()
        return hashers

    def mismatch(self, path: Path, hashers: dict[str, Any], nbytes: int) -> str | None:
        """None when the file matches the pin, else a message naming expected and actual."""
        if self.size is not None and nbytes != self.size:
            return f"size mismatch for {path}: expected {self.size} bytes, got {nbytes}"
        if self.md5:
            actual = hashers["md5"].hexdigest()
            if actual != self.md5:
                return f"checksum mismatch for {path}: md5 expected {self.md5}, got {actual}"
        if self.sha256_prefix:
            actual = hashers["sha256"].hexdigest()
            if not actual.startswith(self.sha256_prefix):
                return (
                    f"checksum mismatch for {path}: sha256 expected to start with "
                    f"{self.sha256_prefix}, got {actual}"
                )
        return None

    @property
    def has_digest(self) -> bool:
        """True when a digest (not only a size) is pinned: only then does a file prove itself."""
        return bool(self.md5 or self.sha256_prefix)


def make_pin(md5: str | None, sha256_prefix: str | None, size: int | None) -> Pin:
    """A `Pin` of validated arguments (hex digests lower-cased); ValueError for a malformed one."""
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")
    if sha256_prefix is not None and not re.fullmatch(r"[0-9a-fA-F]{1,64}", sha256_prefix):
        raise ValueError(f"sha256_prefix must be 1 to 64 hex digits, got {sha256_prefix!r}")
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return Pin(md5.lower() if md5 else None, sha256_prefix.lower() if sha256_prefix else None, size)


def hash_file(path: Path, pin: Pin, progress: bool, desc: str) -> tuple[dict[str, Any], int]:
    """(hashers of `pin` fed with the whole file, its size in bytes), read in `CHUNK` pieces."""
    hashers = pin.new_hashers()
    nbytes = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = path.stat().st_size
    with (
        open(path, "rb", buffering=0) as f,
        progress_bar(total, 0, desc, progress and total > 64 * CHUNK) as bar,
    ):
        while n := f.readinto(buf):
            for h in hashers.values():
                h.update(view[:n])
            nbytes += n
            bar.update(n)
    return hashers, nbytes


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar counting bytes from `initial` of `total` (None: unknown)."""
    # bytes with binary prefixes: tqdm then shows MiB/s and the ETA
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        dynamic_ncols=True,
    )


def human_size(n: float) -> str:
    """`n` bytes with a binary prefix ("1.5 GiB"), for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def check_free_space(directory: Path, needed: int | None, what: str) -> None:
    """Refuse to start writing `needed` bytes into `directory` when the disk cannot hold them."""
    if not needed or needed <= 0:
        return
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DownloadError(
            f"not enough free disk space for {what}: {human_size(needed)} needed in {directory}, "
            f"only {human_size(free)} free; free some space and re-run (a partial download is "
            "kept and resumed)"
        )


def move_into_place(src: Path, dest: Path) -> None:
    """Rename a verified file onto `dest`; across filesystems, copy to a sibling temp first."""
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        check_free_space(dest.parent, src.stat().st_size, str(dest))
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()
    fsync_dir(dest.parent)


def fetch_local(path: Path, dest: Path, pin: Pin, progress: bool) -> str:
    """Hardlink (same filesystem) or copy `path` onto `dest`, verifying it; returns how."""
    if not path.exists():
        raise SourceFailed(f"no such file {path}")
    if not path.is_file():
        raise SourceFailed(f"{path} is not a regular file")
    have = path.stat().st_size
    if pin.size is not None and have != pin.size:
        raise SourceFailed(f"{path} is {have} bytes, expected {pin.size}: not the pinned file")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()
        try:
            os.link(path, tmp)  # same inode: no second copy of 19 GB on a shared cluster
            how = "hardlinked"
            hashers, nbytes = hash_file(tmp, pin, progress, f"verify {dest.name}")
        except OSError:  # other filesystem, or links not allowed there: copy while hashing
            how = "copied"
            check_free_space(dest.parent, have, str(dest))
            hashers, nbytes = _copy_hashing(path, tmp, pin, progress, f"copy {dest.name}")
        problem = pin.mismatch(path, hashers, nbytes)
        if problem:
            raise SourceFailed(problem)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return how
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _copy_hashing(
    src: Path, dst: Path, pin: Pin, progress: bool, desc: str
) -> tuple[dict[str, Any], int]:
    hashers = pin.new_hashers()
    nbytes = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with (
        open(src, "rb", buffering=0) as fin,
        open(dst, "wb", buffering=0) as fout,
        progress_bar(src.stat().st_size, 0, desc, progress) as bar,
    ):
        while n := fin.readinto(buf):
            fout.write(view[:n])
            for h in hashers.values():
                h.update(view[:n])
            nbytes += n
            bar.update(n)
        os.fsync(fout.fileno())
    return hashers, nbytes
