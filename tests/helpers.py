"""Test helpers shared by several modules: CI strictness, a stand-in FCN, a pickle that runs
code, in-process training configs, val shard dirs, an HTTP file server, a Caffe VGG16 file."""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import urlparse

import numpy as np
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


# --- a Caffe VGG16 file, written independently of the project's Caffe reader ---------------------


# VGG_ILSVRC_16_layers_deploy.prototxt, in order: (name, type, num_output); "M": max pool
DEPLOY: tuple[tuple[str, str, int | None], ...] = (
    ("conv1_1", "Convolution", 64), ("relu1_1", "ReLU", None),
    ("conv1_2", "Convolution", 64), ("relu1_2", "ReLU", None), ("pool1", "Pooling", None),
    ("conv2_1", "Convolution", 128), ("relu2_1", "ReLU", None),
    ("conv2_2", "Convolution", 128), ("relu2_2", "ReLU", None), ("pool2", "Pooling", None),
    ("conv3_1", "Convolution", 256), ("relu3_1", "ReLU", None),
    ("conv3_2", "Convolution", 256), ("relu3_2", "ReLU", None),
    ("conv3_3", "Convolution", 256), ("relu3_3", "ReLU", None), ("pool3", "Pooling", None),
    ("conv4_1", "Convolution", 512), ("relu4_1", "ReLU", None),
    ("conv4_2", "Convolution", 512), ("relu4_2", "ReLU", None),
    ("conv4_3", "Convolution", 512), ("relu4_3", "ReLU", None), ("pool4", "Pooling", None),
    ("conv5_1", "Convolution", 512), ("relu5_1", "ReLU", None),
    ("conv5_2", "Convolution", 512), ("relu5_2", "ReLU", None),
    ("conv5_3", "Convolution", 512), ("relu5_3", "ReLU", None), ("pool5", "Pooling", None),
    ("fc6", "InnerProduct", 4096), ("relu6", "ReLU", None), ("drop6", "Dropout", None),
    ("fc7", "InnerProduct", 4096), ("relu7", "ReLU", None), ("drop7", "Dropout", None),
    ("fc8", "InnerProduct", 1000), ("prob", "Softmax", None),
)  # fmt: skip
# caffe.proto, V1LayerParameter.LayerType
V1_TYPES = {
    "Convolution": 4, "Dropout": 6, "InnerProduct": 14, "Pooling": 17, "ReLU": 18, "Softmax": 20,
}  # fmt: skip


def caffe_channels(c: int, width: float) -> int:
    """A Caffe layer's `c` outputs at `width` (rounded, at least 1); fc8's 1,000 ImageNet
    classes are not a width."""
    return c if c == 1000 else max(1, int(math.floor(c * width + 0.5)))


def random_images(seed: int, h: int, w: int) -> torch.Tensor:
    """Two random uint8 RGB images [2, 3, h, w], the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=g)


def assert_matches_caffe(got: torch.Tensor, ref: torch.Tensor) -> None:
    """`got` (the project's net on the pipeline's input) equals `ref` (a Caffe-semantics
    forward on BGR minus the mean) within float32 rounding.

    Both run the same float32 convolutions on the same weights; only the input is formed
    differently (normalize + CaffeInput vs a subtraction): a few float32 ulps (eps 1.2e-7) per
    input value, which 15-16 conv layers with reductions of up to 7*7*C terms carry to ~1e-6 of
    the largest output (measured 0.7-1e-6). 1e-5 leaves a 10x margin and is far below what a
    wrong layout, flatten order, channel order or crop gives (order 1)."""
    assert got.shape == ref.shape
    assert ref.abs().max() > 0  # the activations did not all die: the comparison means something
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def deploy_shapes(width: float = 1.0) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{layer: (weight, bias) shape} from DEPLOY: conv [out, in, 3, 3], InnerProduct [out, in]
    with fc6's `in` = pool5's C * 7 * 7 (224 / 2**5 = 7)."""
    shapes, in_c, spatial = {}, 3, 224
    for name, kind, n in DEPLOY:
        if kind == "Pooling":
            spatial //= 2
        elif kind == "Convolution":
            shapes[name] = ((caffe_channels(n, width), in_c, 3, 3), (caffe_channels(n, width),))
            in_c = caffe_channels(n, width)
        elif kind == "InnerProduct":
            shapes[name] = (
                (caffe_channels(n, width), in_c * spatial * spatial),
                (caffe_channels(n, width),),
            )
            in_c, spatial = caffe_channels(n, width), 1
    return shapes


def caffe_vgg16_blobs(seed: int = 0, width: float = 1 / 16) -> dict[str, list[np.ndarray]]:
    """Random blobs in DEPLOY's order (He-scaled weights, small biases); [] for no weights."""
    rng = np.random.default_rng(seed)
    shapes = deploy_shapes(width)
    blobs: dict[str, list[np.ndarray]] = {}
    for name, _, _ in DEPLOY:
        if name not in shapes:
            blobs[name] = []
            continue
        w, b = shapes[name]
        fan_in = int(np.prod(w[1:]))
        blobs[name] = [
            rng.normal(0, math.sqrt(2 / fan_in), w).astype(np.float32),
            rng.normal(0, 0.1, b).astype(np.float32),
        ]
    return blobs


# --- the test's own protobuf encoder (caffe.proto field numbers) ------------------------------


def proto_varint(n: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def proto_field(number: int, payload: bytes | int) -> bytes:
    """A protobuf field: an int as a varint (wire type 0), bytes length-delimited (type 2)."""
    if isinstance(payload, int):
        return proto_varint(number << 3) + proto_varint(payload)
    return proto_varint(number << 3 | 2) + proto_varint(len(payload)) + payload


def _blob(a: np.ndarray, v1: bool) -> bytes:
    """BlobProto: data = 5 (packed little-endian float32); V1 files give the legacy 4-D shape
    num 1, channels 2, height 3, width 4 (leading 1s), current ones shape = 7 (BlobShape,
    dim = 1, packed int64)."""
    data = proto_field(5, np.ascontiguousarray(a, dtype="<f4").tobytes())
    if v1:
        dims = (1,) * (4 - a.ndim) + a.shape
        return b"".join(proto_field(i, d) for i, d in enumerate(dims, start=1)) + data
    return proto_field(7, proto_field(1, b"".join(proto_varint(d) for d in a.shape))) + data


def _layer(name: str, kind: str, bottom: str, blobs: list[np.ndarray], v1: bool) -> bytes:
    """V1LayerParameter (bottom 2, top 3, name 4, type 5 enum, blobs 6) or LayerParameter
    (name 1, type 2 string, bottom 3, top 4, blobs 7). bottom/top are fields the reader skips."""
    top = name if kind != "ReLU" else bottom  # ReLU runs in place, as in the prototxt
    if v1:
        head = proto_field(2, bottom.encode()) + proto_field(3, top.encode())
        head += proto_field(4, name.encode()) + proto_field(5, V1_TYPES[kind])
        return head + b"".join(proto_field(6, _blob(b, True)) for b in blobs)
    head = proto_field(1, name.encode()) + proto_field(2, kind.encode())
    head += proto_field(3, bottom.encode()) + proto_field(4, top.encode())
    return head + b"".join(proto_field(7, _blob(b, False)) for b in blobs)


def encode_caffe_vgg16(blobs: dict[str, list[np.ndarray]], v1: bool) -> bytes:
    """NetParameter: name = 1, then each layer as layers = 2 (V1) or layer = 100."""
    kinds = {name: kind for name, kind, _ in DEPLOY}
    out, bottom = [proto_field(1, b"VGG_ILSVRC_16_layers")], "data"
    for name, arrays in blobs.items():
        kind = kinds.get(name, "Convolution")
        out.append(proto_field(2 if v1 else 100, _layer(name, kind, bottom, arrays, v1)))
        bottom = bottom if kind == "ReLU" else name
    return b"".join(out)
