"""One pinned file over HTTP(S): streamed into a `.part` file, resumed, retried.

The `.part` file survives failures, kill -9 and DVC deleting the stage outputs: the next
attempt or run sends `Range: bytes=<have>-` plus `If-Range` (the ETag/Last-Modified recorded
when it started, in `<part>.json`) and appends only if the server answers 206 with exactly the
Content-Range asked for; anything else restarts from byte 0. Transient failures (connection
reset/refused, timeouts, 5xx, 429, a body cut short) are retried with exponential backoff; a
4xx or a wrong file raises `SourceFailed` so that the caller tries the next source.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.atomic import atomic_path
from pipeline.data.download_verify import (
    CHUNK,
    DownloadError,
    Pin,
    SourceFailed,
    check_free_space,
    hash_file,
    move_into_place,
    progress_bar,
)

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


USER_AGENT = "fcn-pipeline-download/1 (Python urllib)"


class _Retry(Exception):
    """A transient failure: try the same source again (resuming from the `.part` file)."""


class _RestartFromZero(Exception):
    """The server cannot resume this partial file consistently: discard it, ask for all bytes."""


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


def discard_partial(part: Path, state_path: Path) -> None:
    """Delete a partial download and its start record (missing files are fine)."""
    for p in (part, state_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _usable_offset(part: Path, state_path: Path, url: str, pin: Pin) -> tuple[int, dict]:
    """(bytes of `part` to resume from, its recorded start state); 0 and {} after discarding
    a partial of another file or source. Checks the disk can hold the rest."""
    offset = part.stat().st_size if part.exists() else 0
    state = _read_state(state_path)
    if offset and (
        not _partial_usable(state, url, pin) or (pin.size is not None and offset > pin.size)
    ):
        log.info("%s: discarding a partial download of another file or source", part)
        discard_partial(part, state_path)
        offset, state = 0, {}
    check_free_space(part.parent, None if pin.size is None else pin.size - offset, str(part))
    return offset, state


def _hashers_of_partial(
    part: Path, pin: Pin, offset: int, hashed: dict[str, Any], progress: bool
) -> tuple[dict[str, Any], int]:
    """(hashers fed with the first `offset` bytes of `part`, offset): carried over from the
    previous attempt when it left exactly these bytes, else rebuilt by reading the file."""
    if offset and hashed.get("nbytes") == offset:
        return hashed["hashers"], offset
    if offset:  # a partial from an earlier run: the digest must cover its bytes too
        return hash_file(part, pin, progress, f"rehash partial {part.name}")
    return pin.new_hashers(), offset


def _open(url: str, offset: int, state: dict[str, Any], timeout: float) -> Any:
    """The response to GET `url` (from byte `offset`, guarded by If-Range); a failure becomes
    _Retry (transient: 408, 425, 429, 5xx, network), _RestartFromZero (416 on a Range) or
    SourceFailed (other HTTP errors)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _RestartFromZero(f"server refused Range bytes={offset}- (HTTP 416)") from None
        reason = f"HTTP {e.code} {e.reason}"
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Retry(reason) from None
        raise SourceFailed(reason) from None
    except urllib.error.URLError as e:
        raise _Retry(f"cannot connect: {e.reason}") from None
    except (OSError, HTTPException) as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None


def _response_plan(
    resp: Any, url: str, offset: int, pin: Pin, hashers: dict[str, Any]
) -> tuple[str, int | None, int, dict[str, Any]]:
    """(file mode "ab"/"wb", total size or None, offset, hashers) for a response: a 206 must
    continue exactly at `offset`; a 200 restarts the file from byte 0."""
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
        raise SourceFailed(f"unexpected HTTP status {resp.status}")
    if pin.size is not None and total is not None and total != pin.size:
        raise SourceFailed(f"server announces {total} bytes, expected {pin.size}")
    return mode, total, offset, hashers


def _record_start(resp: Any, state_path: Path, url: str, pin: Pin) -> None:
    """Remember what a fresh download was started from, so that a later run may resume it."""
    etag = resp.headers.get("ETag")
    validator = (  # If-Range needs a strong ETag, else the date
        etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
    )
    started = {"url": url, "pin": [pin.md5, pin.sha256_prefix, pin.size]}
    with atomic_path(state_path) as tmp:
        tmp.write_text(json.dumps({**started, "validator": validator}))


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
    offset, state = _usable_offset(part, state_path, url, pin)
    hashers, offset = _hashers_of_partial(part, pin, offset, hashed, progress)
    if offset and pin.size is not None and offset == pin.size:
        return hashers, offset  # complete already (killed between last byte and rename)
    with _open(url, offset, state, timeout) as resp:
        mode, total, offset, hashers = _response_plan(resp, url, offset, pin, hashers)
        if mode == "wb":
            _record_start(resp, state_path, url, pin)
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
    with (
        open(part, mode, buffering=0) as f,
        progress_bar(expected, offset, part.name, progress) as bar,
    ):
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
                raise SourceFailed(f"server sent more than the expected {expected} bytes")
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


def fetch_http(
    url: str,
    dest: Path,
    part: Path,
    pin: Pin,
    retries: int,
    timeout: float,
    backoff: float,
    progress: bool,
) -> None:
    """Download `url` into `part` (resuming it) and rename it onto `dest` once it matches `pin`.

    Up to `retries` extra attempts after a transient failure (`_Retry`), waiting
    `backoff * 2**k` seconds capped at `MAX_BACKOFF_S`; a partial the server cannot continue
    is restarted from byte 0 once. Raises SourceFailed when this URL cannot deliver the file.
    """
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
            discard_partial(part, state_path)
            hashed.clear()
            attempt -= 1  # not the source's fault: the next request asks for the whole file
            if restarted:
                raise SourceFailed(f"{e}, twice") from None
            restarted = True
            continue
        problem = pin.mismatch(dest, hashers, nbytes)
        if problem is None:
            move_into_place(part, dest)
            discard_partial(part, state_path)
            return
        discard_partial(part, state_path)  # a bad file is never resumed
        hashed.clear()
        if resumed and not restarted:
            # the old partial may have been the bad part (e.g. a file changed on the server)
            log.warning("%s: %s after resuming; downloading it whole once more", url, problem)
            restarted = True
            attempt -= 1
            continue
        raise SourceFailed(f"{problem} (the bad download was deleted)")
    raise SourceFailed(f"{last} (gave up after {attempts} attempt(s))")
