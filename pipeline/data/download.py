"""Fetch one pinned file from a list of sources: resumable, verified, atomic.

`fetch(sources, dest, md5=..., size=...)` tries each source in order (official URL first, then
mirrors, or a local path / file:// URL on a shared cluster) and leaves `dest` only when the bytes
match the pinned checksum. Why each piece is there:

- streamed in 1 MiB chunks into a `.part` file and hashed on the fly: a 19 GB COCO zip never
  sits in memory, and is read from disk once;
- the `.part` file survives failures, kill -9 and DVC deleting the stage outputs (the stage keeps
  it in a scratch folder): the next attempt or run sends `Range: bytes=<have>-` plus `If-Range`
  (the ETag/Last-Modified recorded when it started) and appends only if the server answers 206
  with exactly the Content-Range asked for; anything else restarts from byte 0;
- transient failures (connection reset/refused, timeouts, 5xx, 429, a body cut short) are
  retried with exponential backoff; a 4xx or a wrong file falls through to the next source;
- the checksum is verified BEFORE the rename onto `dest`, so `dest` is either right or absent;
- a local source is hardlinked into place when it is on the same filesystem (nothing copied
  twice), else copied; its checksum is verified either way.

Only the standard library talks HTTP (urllib.request): no extra dependency.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.atomic import atomic_path, fsync_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read: large enough for ~GB/s, small enough for flat memory
MAX_BACKOFF_S = 60.0
USER_AGENT = "fcn-pipeline-download/1 (Python urllib)"
DEFAULT_HINT = (
    "To use a copy you already have, add its local path or a file:// URL to this source's "
    "`urls` list in params.yaml (for example `full.download.voc.urls`); sources are tried in order."
)


class DownloadError(RuntimeError):
    """No source delivered the pinned file; the message lists every source and why it failed."""


class _Retry(Exception):
    """A transient failure: try the same source again (resuming from the `.part` file)."""


class _SourceFailed(Exception):
    """This source cannot deliver the file (404, wrong size, checksum mismatch): try the next."""


class _RestartFromZero(Exception):
    """The server cannot resume this partial file consistently: discard it, ask for all bytes."""


# --- what the file must be -------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """The expected identity of a file: any of md5, sha256 prefix and size (None = unchecked)."""

    md5: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None

    def new_hashers(self) -> dict[str, Any]:
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
        return bool(self.md5 or self.sha256_prefix)


def _make_pin(md5: str | None, sha256_prefix: str | None, size: int | None) -> Pin:
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")
    if sha256_prefix is not None and not re.fullmatch(r"[0-9a-fA-F]{1,64}", sha256_prefix):
        raise ValueError(f"sha256_prefix must be 1 to 64 hex digits, got {sha256_prefix!r}")
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return Pin(md5.lower() if md5 else None, sha256_prefix.lower() if sha256_prefix else None, size)


def _hash_file(path: Path, pin: Pin, progress: bool, desc: str) -> tuple[dict[str, Any], int]:
    hashers = pin.new_hashers()
    nbytes = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = path.stat().st_size
    with (
        open(path, "rb", buffering=0) as f,
        _bar(total, 0, desc, progress and total > 64 * CHUNK) as bar,
    ):
        while n := f.readinto(buf):
            for h in hashers.values():
                h.update(view[:n])
            nbytes += n
            bar.update(n)
    return hashers, nbytes


def _bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
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


# --- sources -----------------------------------------------------------------------------------


def parse_source(source: str) -> tuple[str, str | Path]:
    """("http", url) or ("file", path) for one entry of a `urls` list; other schemes refused."""
    parsed = urlparse(source)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise DownloadError(f"source {source!r}: URL without a host")
        return "http", source
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(
                f"source {source!r}: file:// URLs must name a local path (file:///path), "
                f"not a host ({parsed.netloc!r}); mount the share and use its path"
            )
        return "file", Path(urllib.request.url2pathname(parsed.path))
    if scheme == "" or len(scheme) == 1:  # a plain path, or a Windows drive letter (C:\...)
        return "file", Path(os.path.expanduser(source))
    raise DownloadError(
        f"source {source!r}: scheme {scheme!r} is not supported; "
        "use an http(s):// URL, a file:// URL or a local path"
    )


# --- disk and placement ------------------------------------------------------------------------


def _human(n: float) -> str:
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
            f"not enough free disk space for {what}: {_human(needed)} needed in {directory}, "
            f"only {_human(free)} free; free some space and re-run (a partial download is "
            "kept and resumed)"
        )


def _move_into_place(src: Path, dest: Path) -> None:
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


# --- local sources -------------------------------------------------------------------------------


def _fetch_local(path: Path, dest: Path, pin: Pin, progress: bool) -> str:
    """Hardlink (same filesystem) or copy `path` onto `dest`, verifying it; returns how."""
    if not path.exists():
        raise _SourceFailed(f"no such file {path}")
    if not path.is_file():
        raise _SourceFailed(f"{path} is not a regular file")
    have = path.stat().st_size
    if pin.size is not None and have != pin.size:
        raise _SourceFailed(f"{path} is {have} bytes, expected {pin.size}: not the pinned file")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()
        try:
            os.link(path, tmp)  # same inode: no second copy of 19 GB on a shared cluster
            how = "hardlinked"
            hashers, nbytes = _hash_file(tmp, pin, progress, f"verify {dest.name}")
        except OSError:  # other filesystem, or links not allowed there: copy while hashing
            how = "copied"
            check_free_space(dest.parent, have, str(dest))
            hashers, nbytes = _copy_hashing(path, tmp, pin, progress, f"copy {dest.name}")
        problem = pin.mismatch(path, hashers, nbytes)
        if problem:
            raise _SourceFailed(problem)
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
        _bar(src.stat().st_size, 0, desc, progress) as bar,
    ):
        while n := fin.readinto(buf):
            fout.write(view[:n])
            for h in hashers.values():
                h.update(view[:n])
            nbytes += n
            bar.update(n)
        os.fsync(fout.fileno())
    return hashers, nbytes


# --- HTTP --------------------------------------------------------------------------------------


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp://; a pinned download follows http(s) only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to unsupported URL {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _parse_content_range(value: str | None, offset: int) -> int | None:
    """Total size from `bytes <offset>-<end>/<total>`; None unless it starts exactly at offset."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m or int(m.group(1)) != offset:
        return None
    end = int(m.group(2))
    total = end + 1 if m.group(3) == "*" else int(m.group(3))
    return total if end == total - 1 else None


def _read_state(state_path: Path) -> dict[str, Any]:
    try:
        return json.loads(state_path.read_text())
    except (OSError, ValueError):
        return {}


def _partial_usable(state: dict[str, Any], url: str, pin: Pin) -> bool:
    """A `.part` may be continued only if it was started for the same pinned file."""
    if state.get("pin") != [pin.md5, pin.sha256_prefix, pin.size]:
        return False
    # same URL: If-Range guards against a changed file; another mirror: only a digest does
    return state.get("url") == url or pin.has_digest


def _discard(part: Path, state_path: Path) -> None:
    for p in (part, state_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _http_attempt(
    url: str,
    part: Path,
    state_path: Path,
    pin: Pin,
    timeout: float,
    progress: bool,
    hashed: dict[str, Any],
) -> tuple[dict[str, Any], int]:
    """One request: resume or start `part`, stream the body; returns (hashers, total bytes).

    `hashed` carries the hashers of the bytes already in `part` from one attempt to the next,
    so that a retry within a run does not re-read a 15 GB partial file to rebuild them.
    """
    offset = part.stat().st_size if part.exists() else 0
    state = _read_state(state_path)
    if offset and (
        not _partial_usable(state, url, pin) or (pin.size is not None and offset > pin.size)
    ):
        log.info("%s: discarding a partial download of another file or source", part)
        _discard(part, state_path)
        offset, state = 0, {}
    check_free_space(part.parent, None if pin.size is None else pin.size - offset, str(part))

    hashers = pin.new_hashers()
    if offset and hashed.get("nbytes") == offset:
        hashers = hashed["hashers"]
    elif offset:  # a partial from an earlier run: the digest must cover its bytes too
        hashers, offset = _hash_file(part, pin, progress, f"rehash partial {part.name}")
    if offset and pin.size is not None and offset == pin.size:
        return hashers, offset  # complete already (killed between last byte and rename)

    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
    try:
        resp = _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _RestartFromZero(f"server refused Range bytes={offset}- (HTTP 416)") from None
        reason = f"HTTP {e.code} {e.reason}"
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Retry(reason) from None
        raise _SourceFailed(reason) from None
    except urllib.error.URLError as e:
        raise _Retry(f"cannot connect: {e.reason}") from None
    except (OSError, HTTPException) as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None

    with resp:
        if resp.status == 206 and offset:
            total = _parse_content_range(resp.headers.get("Content-Range"), offset)
            if total is None or (pin.size is not None and total != pin.size):
                raise _RestartFromZero(
                    f"server answered 206 with Content-Range {resp.headers.get('Content-Range')!r} "
                    f"to Range bytes={offset}-"
                )
            mode = "ab"
        elif resp.status == 200:
            if offset:
                log.info("%s: server sent the whole file instead of resuming; restarting", url)
                offset, hashers = 0, pin.new_hashers()
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise _SourceFailed(f"unexpected HTTP status {resp.status}")
        if pin.size is not None and total is not None and total != pin.size:
            raise _SourceFailed(f"server announces {total} bytes, expected {pin.size}")
        if mode == "wb":  # remember what was started, so that a later run may resume it
            etag = resp.headers.get("ETag")
            validator = (  # If-Range needs a strong ETag, else the date
                etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            )
            started = {"url": url, "pin": [pin.md5, pin.sha256_prefix, pin.size]}
            with atomic_path(state_path) as tmp:
                tmp.write_text(json.dumps({**started, "validator": validator}))
        expected = total if total is not None else pin.size
        check_free_space(part.parent, None if expected is None else expected - offset, str(part))
        hashed.update(hashers=hashers, nbytes=offset)
        received = _stream(resp, part, mode, hashed, expected, progress)

    if expected is not None and received < expected:
        raise _Retry(f"connection closed after {received} of {expected} bytes")
    return hashers, received


def _stream(
    resp: Any, part: Path, mode: str, hashed: dict[str, Any], expected: int | None, progress: bool
) -> int:
    """Append the body to `part` (unbuffered: a kill -9 loses nothing already written)."""
    hashers, received = hashed["hashers"], hashed["nbytes"]
    offset = received
    with open(part, mode, buffering=0) as f, _bar(expected, offset, part.name, progress) as bar:
        while True:
            try:
                # read1: what has arrived (<= 1 MiB), so a stalled connection still leaves
                # every received byte on disk
                chunk = resp.read1(CHUNK)
            except (OSError, HTTPException) as e:  # timeouts and resets: keep what arrived
                raise _Retry(f"transfer interrupted after {received} bytes: {e}") from None
            if not chunk:
                return received
            n = len(chunk)
            if expected is not None and received + n > expected:
                raise _SourceFailed(f"server sent more than the expected {expected} bytes")
            try:
                view = memoryview(chunk)
                while view:  # a raw (unbuffered) write may be short
                    view = view[f.write(view) :]
            except OSError as e:
                raise DownloadError(f"cannot write {part}: {e}") from None
            for h in hashers.values():
                h.update(chunk)
            received += n
            hashed["nbytes"] = received
            bar.update(n)


def _fetch_http(
    url: str,
    dest: Path,
    part: Path,
    pin: Pin,
    retries: int,
    timeout: float,
    backoff: float,
    progress: bool,
) -> None:
    state_path = part.with_name(part.name + ".json")
    attempts = retries + 1
    restarted = False
    last = ""
    attempt = 0
    hashed: dict[str, Any] = {}
    while attempt < attempts:
        if attempt:
            delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
            log.warning("%s: %s; retry %d/%d in %.1f s", url, last, attempt, retries, delay)
            time.sleep(delay)
        attempt += 1
        resumed = part.exists() and part.stat().st_size > 0
        try:
            hashers, nbytes = _http_attempt(url, part, state_path, pin, timeout, progress, hashed)
        except _Retry as e:
            last = str(e)
            continue
        except _RestartFromZero as e:
            log.warning("%s: %s; restarting from byte 0", url, e)
            _discard(part, state_path)
            hashed.clear()
            attempt -= 1  # not the source's fault: the next request asks for the whole file
            if restarted:
                raise _SourceFailed(f"{e}, twice") from None
            restarted = True
            continue
        problem = pin.mismatch(dest, hashers, nbytes)
        if problem is None:
            _move_into_place(part, dest)
            _discard(part, state_path)
            return
        _discard(part, state_path)  # a bad file is never resumed
        hashed.clear()
        if resumed and not restarted:
            # the old partial may have been the bad part (e.g. a file changed on the server)
            log.warning("%s: %s after resuming; downloading it whole once more", url, problem)
            restarted = True
            attempt -= 1
            continue
        raise _SourceFailed(f"{problem} (the bad download was deleted)")
    raise _SourceFailed(f"{last} (gave up after {attempts} attempt(s))")


# --- the public entry point --------------------------------------------------------------------


def fetch(
    sources: Sequence[str],
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256_prefix: str | None = None,
    size: int | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    partial_dir: str | os.PathLike | None = None,
    backoff: float = 1.0,
    hint: str | None = None,
) -> Path:
    """Put the pinned file at `dest` from the first source that delivers it; return `dest`.

    `sources`: http(s) URLs, file:// URLs or local paths, tried in order. `md5` / `sha256_prefix`
    (the hex digest must start with it) / `size` pin the file. HTTP downloads go to
    `<partial_dir>/<dest name>.part` (default: beside `dest`), which is kept when every source
    fails so that the next call resumes it. `retries` extra attempts per source, waiting
    `backoff * 2**k` seconds (capped at 60). `hint` ends the error message (how to point the
    params at a local copy). Raises DownloadError when no source delivered the pinned file.
    """
    dest = Path(dest)
    try:
        pin = _make_pin(md5, sha256_prefix, size)
    except ValueError as e:
        raise ValueError(f"{dest}: {e}") from None
    if retries < 0:
        raise ValueError(f"{dest}: retries must be >= 0, got {retries}")
    hint = hint or DEFAULT_HINT
    parsed = [(s, *parse_source(str(s))) for s in sources]
    if not parsed:
        raise DownloadError(f"no source given for {dest}. {hint}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_dir = Path(partial_dir) if partial_dir is not None else dest.parent
    part_dir.mkdir(parents=True, exist_ok=True)
    part = part_dir / f"{dest.name}.part"

    if dest.is_file() and pin.has_digest:
        hashers, nbytes = _hash_file(dest, pin, progress, f"verify {dest.name}")
        if pin.mismatch(dest, hashers, nbytes) is None:
            log.info("%s: already present and verified", dest)
            return dest
        log.warning("%s: present but does not match the pin; fetching it again", dest)

    failures: list[tuple[str, str]] = []
    for source, kind, where in parsed:
        try:
            if kind == "file":
                how = _fetch_local(Path(where), dest, pin, progress)
                log.info("%s: %s from %s and verified", dest, how, where)
            else:
                _fetch_http(str(where), dest, part, pin, retries, timeout, backoff, progress)
                log.info("%s: downloaded from %s and verified", dest, where)
            return dest
        except _SourceFailed as e:
            log.warning("%s: %s", source, e)
            failures.append((source, str(e)))

    lines = [f"could not fetch {dest.name} into {dest}: every source failed:"]
    lines += [f"  {i}. {src}: {why}" for i, (src, why) in enumerate(failures, 1)]
    if part.exists():
        lines.append(
            f"The partial download {part} ({_human(part.stat().st_size)}) is kept; "
            "re-running resumes it."
        )
    lines.append(hint)
    raise DownloadError("\n".join(lines))
