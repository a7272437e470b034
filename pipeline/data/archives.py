"""Read the downloaded archives in place, safely: never unpack 19 GB into the DVC cache.

- zip (COCO): random access through `ZipReader` (one central directory read, then `read(name)`);
- tar (VOC): one sequential pass through `iter_tar_files` (tarfile stream mode, bounded memory);
- `safe_extract` for the rare case where files are needed on disk.

An archive is outside data: every member name is checked (no absolute paths, no `..`, no drive
letters; for tar no links leading outside and no device files) and a hostile member is refused
with an ArchiveError naming the archive and the member, before anything is written. A truncated
or corrupt archive (an interrupted copy, a full disk) gives an ArchiveError that says so instead
of a bare `BadZipFile` or, worse for tar, a silently shorter member list.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import posixpath
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.atomic import atomic_dir


class ArchiveError(ValueError):
    """A hostile, truncated or corrupt archive; the message names the file (and the member)."""


def _corrupt(archive: str | os.PathLike, kind: str, detail: Any) -> ArchiveError:
    return ArchiveError(
        f"{archive}: truncated or corrupt {kind} archive ({detail}); delete it and re-run the "
        "download stage (e.g. `dvc repro -f download_voc` / `download_coco`)"
    )


# --- member checks -------------------------------------------------------------------------


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member_name(name: str, archive: str | os.PathLike) -> str:
    """Return the member's normalised relative path; ArchiveError if it could escape `dest`.

    Refused: empty names, NUL bytes, absolute paths (`/x`, `\\x`), drive letters (`C:x`) and any
    `..` component. `./` components and trailing slashes are dropped (tar writes `./a/b`).
    """
    if not name or "\x00" in name:
        raise ArchiveError(f"{archive}: member {name!r} has an empty or NUL-containing name")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing it")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {name!r} contains '..'; refusing it")
    if not parts:
        raise ArchiveError(f"{archive}: member {name!r} names no file")
    return "/".join(parts)


def check_tar_member(member: tarfile.TarInfo, archive: str | os.PathLike) -> str:
    """`check_member_name` plus tar's own hazards: escaping links and device files."""
    name = check_member_name(member.name, archive)
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveError(f"{archive}: member {member.name!r} is a device or fifo; refusing it")
    if member.issym():
        # a symlink target is relative to the link's own directory
        target = member.linkname
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if target.startswith(("/", "\\")) or _DRIVE.match(target) or resolved.startswith(".."):
            raise ArchiveError(
                f"{archive}: symlink member {member.name!r} -> {target!r} points outside "
                "the archive; refusing it"
            )
    elif member.islnk():
        # a hardlink target is a member path relative to the archive root
        try:
            check_member_name(member.linkname, archive)
        except ArchiveError:
            raise ArchiveError(
                f"{archive}: hardlink member {member.name!r} -> {member.linkname!r} points "
                "outside the archive; refusing it"
            ) from None
    return name


# --- tar ---------------------------------------------------------------------------------------


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading headers.

    tarfile ends iteration silently on a missing or cut header after the first member, so a tar
    cut at a member boundary would look complete. A real archive ends with a zero block
    (EOFHeaderError); anything else at the end means truncation or corruption.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_._fcn_end = None  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as e:
            tarfile_._fcn_end = f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            raise


def _check_tar_end(tf: tarfile.TarFile, archive: str | os.PathLike) -> None:
    problem = getattr(tf, "_fcn_end", "no end-of-archive marker")
    if problem is not None:
        raise _corrupt(archive, "tar", f"{problem} at byte {tf.offset}")


# what reading a cut or damaged (possibly compressed) tar raises; not OSError: a full disk while
# extracting is not the archive's fault
_TAR_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def iter_tar_files(
    tar_path: str | os.PathLike, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, bytes)` of the regular-file members, in archive order, in one pass.

    `wanted(name)` (normalised name, e.g. `VOCdevkit/VOC2012/JPEGImages/x.jpg`) selects which
    members are read; the others are skipped without reading their data into memory. Every
    member, wanted or not, is checked: a hostile one raises ArchiveError. Compressed tars
    (.tar.gz/.bz2/.xz) work too. Memory stays flat: the member list is not accumulated.
    """
    tar_path = Path(tar_path)
    try:
        tf = tarfile.open(tar_path, mode="r|*", tarinfo=_EndAwareTarInfo)  # noqa: SIM115
    except _TAR_READ_ERRORS as e:
        raise _corrupt(tar_path, "tar", e) from None
    with tf:
        while True:
            try:
                member = tf.next()
            except _TAR_READ_ERRORS as e:
                raise _corrupt(tar_path, "tar", e) from None
            if member is None:
                break
            name = check_tar_member(member, tar_path)
            tf.members = []  # stream mode still appends every TarInfo: keep memory flat
            if not member.isfile() or (wanted is not None and not wanted(name)):
                continue
            try:
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
            except _TAR_READ_ERRORS as e:
                raise _corrupt(tar_path, "tar", f"member {member.name!r}: {e}") from None
            if len(data) != member.size:
                raise _corrupt(
                    tar_path, "tar", f"member {member.name!r}: {len(data)} of {member.size} bytes"
                )
            yield name, data
        _check_tar_end(tf, tar_path)


def _is_zip(path: Path) -> bool:
    # by the magic number, not zipfile.is_zipfile: a truncated zip has lost its central
    # directory and must still be reported as a damaged zip, not as "not a tar"
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def safe_extract(
    archive_path: str | os.PathLike, dest: str | os.PathLike, members: Iterable[str] | None = None
) -> Path:
    """Extract a tar or zip archive (all of it, or the named `members`) into `dest`.

    Every member is checked first; tar extraction additionally runs with tarfile's
    `filter="data"`. `dest` is written atomically as a whole (it replaces an existing `dest`):
    a refused or truncated archive leaves nothing behind.
    """
    archive_path, dest = Path(archive_path), Path(dest)
    if not archive_path.is_file():
        raise FileNotFoundError(f"{archive_path}: archive not found")
    want = None if members is None else {check_member_name(m, archive_path) for m in members}
    with atomic_dir(dest) as tmp:
        if _is_zip(archive_path):
            _extract_zip(archive_path, tmp, want)
        else:
            _extract_tar(archive_path, tmp, want)
    return dest


def _missing(want: set[str] | None, found: set[str], archive: Path) -> None:
    if want is not None and want - found:
        raise ArchiveError(f"{archive}: no member(s) {sorted(want - found)} in the archive")


def _extract_tar(archive: Path, out: Path, want: set[str] | None) -> None:
    try:
        with tarfile.open(archive, mode="r:*", tarinfo=_EndAwareTarInfo) as tf:
            chosen, found = [], set()
            for member in tf.getmembers():
                name = check_tar_member(member, archive)
                if want is None or name in want:
                    chosen.append(member)
                    found.add(name)
            _check_tar_end(tf, archive)
            _missing(want, found, archive)
            tf.extractall(out, members=chosen, filter="data")
    except tarfile.FilterError as e:  # our checks come first; this is the second line of defence
        raise ArchiveError(f"{archive}: member refused by tarfile's data filter: {e}") from None
    except _TAR_READ_ERRORS as e:
        raise _corrupt(archive, "tar", e) from None


def _extract_zip(archive: Path, out: Path, want: set[str] | None) -> None:
    with ZipReader(archive) as zr:
        names = [n for n in zr.names() if want is None or check_member_name(n, archive) in want]
        _missing(want, {check_member_name(n, archive) for n in names}, archive)
        for n in names:
            target = out / check_member_name(n, archive)
            if n.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zr.open(n) as src, open(target, "wb") as dst:
                try:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise _corrupt(archive, "zip", f"member {n!r}: {e}") from None


# --- zip: random access ------------------------------------------------------------------------


class ZipReader:
    """Random access to the members of a zip file, safe to pickle into DataLoader workers.

    The central directory is read (and every member name checked) once per process; a
    truncated or corrupt file gives ArchiveError naming it. `read(name)` returns a member's
    bytes, `open(name)` a stream (for a 450 MB annotation JSON).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._zf: zipfile.ZipFile | None = None
        self._pid = os.getpid()
        self._zip()  # fail now, not in the middle of a later stage

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is not None and self._pid == os.getpid():
            return self._zf
        self._pid = os.getpid()  # after fork: a file position shared with the parent is unsafe
        try:
            zf = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: zip archive not found") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
            raise _corrupt(self.path, "zip", e) from None
        try:
            for info in zf.infolist():
                check_member_name(info.filename, self.path)
        except ArchiveError:
            zf.close()
            raise
        self._zf = zf
        return zf

    def names(self) -> list[str]:
        """Member names as stored (directories end with '/')."""
        return self._zip().namelist()

    def __contains__(self, name: str) -> bool:
        try:
            self._zip().getinfo(name)
        except KeyError:
            return False
        return True

    def _info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self._zip().getinfo(name)
        except KeyError:
            raise ArchiveError(f"{self.path}: no member {name!r} in the archive") from None

    def open(self, name: str) -> IO[bytes]:
        info = self._info(name)
        try:
            return self._zip().open(info)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise _corrupt(self.path, "zip", f"member {name!r}: {e}") from None

    def read(self, name: str) -> bytes:
        info = self._info(name)
        try:
            return self._zip().read(info)  # checks the CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise _corrupt(self.path, "zip", f"member {name!r}: {e}") from None

    def close(self) -> None:
        if self._zf is not None and self._pid == os.getpid():
            self._zf.close()
        self._zf = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zf": None}

    def __enter__(self) -> ZipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
