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

Only the standard library talks HTTP (urllib.request): no extra dependency. The parts:
`pipeline.data.download_http` (requests, resume, retries) and
`pipeline.data.download_verify` (the pin, hashing, local sources, disk space, placement).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from pipeline.data.download_http import fetch_http
from pipeline.data.download_verify import (
    DownloadError,
    Pin,
    SourceFailed,
    fetch_local,
    hash_file,
    human_size,
    make_pin,
)

log = logging.getLogger(__name__)

DEFAULT_HINT = (
    "To use a copy you already have, add its local path or a file:// URL to this source's "
    "`urls` list of the profile (for example `download.voc.urls` in conf/profile/full.yaml); "
    "sources are tried in order."
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
    pin = _checked_pin(dest, md5, sha256_prefix, size, retries)
    hint = hint or DEFAULT_HINT
    parsed = [(s, *parse_source(str(s))) for s in sources]
    if not parsed:
        raise DownloadError(f"no source given for {dest}. {hint}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_dir = Path(partial_dir) if partial_dir is not None else dest.parent
    part_dir.mkdir(parents=True, exist_ok=True)
    part = part_dir / f"{dest.name}.part"
    if _already_present(dest, pin, progress):
        return dest
    failures: list[tuple[str, str]] = []
    for source, kind, where in parsed:
        try:
            if kind == "file":
                how = fetch_local(Path(where), dest, pin, progress)
                log.info("%s: %s from %s and verified", dest, how, where)
            else:
                fetch_http(str(where), dest, part, pin, retries, timeout, backoff, progress)
                log.info("%s: downloaded from %s and verified", dest, where)
            return dest
        except SourceFailed as e:
            log.warning("%s: %s", source, e)
            failures.append((source, str(e)))
    raise DownloadError(_failure_message(dest, part, failures, hint))


def _checked_pin(
    dest: Path, md5: str | None, sha256_prefix: str | None, size: int | None, retries: int
) -> Pin:
    """The pin of `fetch`'s arguments; ValueError naming `dest` for a malformed one."""
    try:
        pin = make_pin(md5, sha256_prefix, size)
    except ValueError as e:
        raise ValueError(f"{dest}: {e}") from None
    if retries < 0:
        raise ValueError(f"{dest}: retries must be >= 0, got {retries}")
    return pin


def _already_present(dest: Path, pin: Pin, progress: bool) -> bool:
    """`dest` exists and matches a pin with a digest (a size alone never proves it)."""
    if not (dest.is_file() and pin.has_digest):
        return False
    hashers, nbytes = hash_file(dest, pin, progress, f"verify {dest.name}")
    if pin.mismatch(dest, hashers, nbytes) is None:
        log.info("%s: already present and verified", dest)
        return True
    log.warning("%s: present but does not match the pin; fetching it again", dest)
    return False


def _failure_message(dest: Path, part: Path, failures: list[tuple[str, str]], hint: str) -> str:
    """Every source with why it failed, the partial download kept (if any), then `hint`."""
    lines = [f"could not fetch {dest.name} into {dest}: every source failed:"]
    lines += [f"  {i}. {src}: {why}" for i, (src, why) in enumerate(failures, 1)]
    if part.exists():
        lines.append(
            f"The partial download {part} ({human_size(part.stat().st_size)}) is kept; "
            "re-running resumes it."
        )
    lines.append(hint)
    return "\n".join(lines)
