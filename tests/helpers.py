"""Test helpers shared by several modules: CI strictness, a stand-in FCN, a pickle that runs
code, in-process training configs, val shard dirs, an HTTP file server."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import urlparse

import pytest
import torch
from torch import nn

from pipeline.classes import NUM_CLASSES


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


# CI sets CI=true; .ci/run also sets FCN_REQUIRE_ALL_TESTS=1 so that a local `bash .ci/run` is strict
REQUIRE_ALL = _truthy(os.environ.get("CI")) or _truthy(os.environ.get("FCN_REQUIRE_ALL_TESTS"))


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the current test, or fail it in CI, where a skip would hide lost coverage."""
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (CI: FCN_REQUIRE_ALL_TESTS/CI is set, so this is a failure)")
    pytest.skip(reason)


def import_or_skip(name: str) -> ModuleType:
    """`import name`; when it is not installed, a skip, or a failure in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        skip_or_fail(f"{name} is not installed ({e}): pip install -e '.[test]'")


class TinyFCN(nn.Module):
    """Stand-in with the FCN contract: [N, 3, H, W] -> [N, 21, H, W] logits at the input size."""

    normalization = "imagenet"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.score = nn.Conv2d(8, NUM_CLASSES, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size."""
        return self.score(torch.relu(self.conv(x)))


class PlantedCode:
    """A pickled object whose unpickling runs code: it creates the file `marker`. A reader that
    refuses it leaves no `marker`; one that runs pickled code creates it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- training in-process, shard dirs --------------------------------------------------------


# Training from scratch at a test's size: width 1/16, random init, fp32 on the CPU, batch 2 of
# 48 px crops. base_cfg (in-process training) and the stage tests' params.yaml use both.
FROM_SCRATCH_MODEL: dict[str, Any] = {"width": 0.0625, "backbone_init": "random", "dropout": 0.0}
FROM_SCRATCH_TRAIN: dict[str, Any] = {
    "device": "cpu",
    "precision": "fp32",
    "batch_size": 2,
    "workers": 0,
    "crop_size": 48,
    "checkpoint_every": 1000,
    "val_every": 1,
}


def base_cfg(**train_overrides: Any) -> dict[str, Any]:
    """The test profile (`repo_utils.tiny_cfg`) for in-process training from scratch
    (FROM_SCRATCH_MODEL / FROM_SCRATCH_TRAIN); `train_overrides` replace train keys."""
    from tests.repo_utils import tiny_cfg

    cfg = tiny_cfg()
    cfg["model"].update(FROM_SCRATCH_MODEL)
    cfg["train"].update(
        FROM_SCRATCH_TRAIN,
        accumulate=1,
        score_lr_mult=1.0,  # the release's rates: what the from-scratch tests measured
    )
    for key, value in train_overrides.items():
        cfg["train"][key] = value
    return cfg


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a model file the training loop wrote (weights-only load)."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def write_val_shards(
    out: Path, voc: Path, ids: list[str], labels: dict[str, bytes] | None = None
) -> Path:
    """A val shard dir as preprocess writes it: original JPEG bytes + original label PNG bytes
    (`labels`: replacement PNG bytes for some ids)."""
    import io

    from PIL import Image

    from pipeline.data.shards import ShardWriter

    with ShardWriter(out, shard_size=2) as w:
        for i in ids:
            jpg = (voc / "JPEGImages" / f"{i}.jpg").read_bytes()
            png = (labels or {}).get(i) or (voc / "SegmentationClass" / f"{i}.png").read_bytes()
            with Image.open(io.BytesIO(jpg)) as im:
                width, height = im.size
            w.add(
                f"voc/{i}",
                {"image": jpg, "label": png},
                {"height": height, "width": width, "source": "voc"},
            )
    return out


# --- a real HTTP server on 127.0.0.1 ----------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = urlparse(self.path).path
        rec = {"path": path, "range": self.headers.get("Range"), "sent": 0, "status": None}
        rec["if_range"] = self.headers.get("If-Range")
        with srv.lock:
            first = not any(r["path"] == path for r in srv.requests)
            srv.requests.append(rec)
        if path in srv.status:
            rec["status"] = srv.status[path]
            self.send_error(srv.status[path])
            return
        data = srv.files.get(path)
        if data is None:
            rec["status"] = 404
            self.send_error(404)
            return
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", rec["range"] or "")
        honour_range = srv.ranges and path not in srv.ignore_range
        if m and honour_range and rec["if_range"] in (None, etag):
            start, status = int(m.group(1)), 206
            if start >= len(data):
                rec["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
        body = memoryview(data)[start:]
        rec["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        if srv.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            first_byte = 0 if path in srv.bad_content_range else start
            self.send_header("Content-Range", f"bytes {first_byte}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        limit = len(body)
        if first and path in srv.cut_after:
            limit = srv.cut_after[path]
        if first and path in srv.stall_after:
            limit = srv.stall_after[path]
        try:
            for i in range(0, limit, 65536):
                chunk = body[i : min(i + 65536, limit)]
                self.wfile.write(chunk)
                rec["sent"] += len(chunk)
            self.wfile.flush()
            if first and path in srv.stall_after:
                srv.release.wait(30)  # hold the connection open until the client is killed
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class FileServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 and records every request.

    It can misbehave on request: cut a first response short (`cut_after`), stall
    (`stall_after`), ignore Range (`ignore_range`, or `ranges=False` for every path: whole
    files only), answer a wrong Content-Range (`bad_content_range`) or fail with a status.
    `sent(path)` counts the body bytes it wrote.
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, ranges: bool = True) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.ranges = ranges
        self.requests: list[dict] = []
        self.status: dict[str, int] = {}
        self.cut_after: dict[str, int] = {}  # first request: close after N body bytes
        self.stall_after: dict[str, int] = {}  # first request: send N bytes, then hang
        self.ignore_range: set[str] = set()
        self.bad_content_range: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        """The http:// URL of `path` on this server."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def sent(self, path: str) -> int:
        """Body bytes sent for `path`, over all requests."""
        return sum(r["sent"] for r in self.hits(path))

    def hits(self, path: str) -> list[dict]:
        """The requests for `path`, in order."""
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        """Release stalled responses and stop serving."""
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
