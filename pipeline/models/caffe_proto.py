"""The `.caffemodel` byte format, read without Caffe: schema, reader, writer, integrity checks.

A `.caffemodel` is a binary protobuf `caffe.NetParameter`. This module declares the few fields it
reads (`caffe_schema`), built at import time with `descriptor_pb2` + `message_factory` in a
private descriptor pool: no protoc step, no generated file, no clash with a real `caffe` package.
Field numbers are those of BVLC Caffe's src/caffe/proto/caffe.proto:

    NetParameter      name = 1, layers = 2 (V1LayerParameter, old files), layer = 100
    LayerParameter    name = 1, type = 2, blobs = 7
    V1LayerParameter  name = 4, type = 5 (an enum there; the same varint on the wire), blobs = 6
    BlobProto         num = 1, channels = 2, height = 3, width = 4 (legacy 4-D shape),
                      data = 5 (packed float), shape = 7, double_data = 8 (packed double)
    BlobShape         dim = 1 (packed int64)

Every other field of the real schema is skipped by the parser as an unknown field.

A download cut short is told apart from foreign bytes: `read_caffemodel` walks the top-level
fields of a file protobuf refuses (`_why_unparsable`), and `truncation_hint` recognises a file
cut right after a complete layer, which parses.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from pipeline.models.surgery import VGG16_CFG, VGG16_CONV_INDICES

# --- the schema ------------------------------------------------------------------------------

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "fcn_pipeline.caffe_min"
# (message, [(field name, number, type, label, message type or None, packed)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str | None, bool]]]] = [
    ("BlobShape", [("dim", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, None, True)]),
    (
        "BlobProto",
        [
            ("num", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
            ("channels", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
            ("height", 3, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
            ("width", 4, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
            ("data", 5, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True),
            ("shape", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "BlobShape", False),
            ("double_data", 8, _F.TYPE_DOUBLE, _F.LABEL_REPEATED, None, True),
        ],
    ),
    (
        "LayerParameter",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("type", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("blobs", 7, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "BlobProto", False),
        ],
    ),
    (
        "V1LayerParameter",
        [
            ("name", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("type", 5, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
            ("blobs", 6, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "BlobProto", False),
        ],
    ),
    (
        "NetParameter",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("layers", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "V1LayerParameter", False),
            ("layer", 100, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "LayerParameter", False),
        ],
    ),
]


def _build_schema() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fcn_pipeline_caffe_min.proto", package=_PACKAGE, syntax="proto2"
    )
    for msg_name, fields in _MESSAGES:
        msg = fdp.message_type.add(name=msg_name)
        for name, number, ftype, label, type_name, packed in fields:
            f = msg.field.add(name=name, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name, _ in _MESSAGES
    }


caffe_schema: dict[str, type] = _build_schema()
NetParameter = caffe_schema["NetParameter"]
# NetParameter's field numbers in caffe.proto (see `_why_unparsable`)
_NET_FIELDS = frozenset((1, 2, 3, 4, 5, 6, 7, 8, 100))
_LOOKS_TRUNCATED = "looks incomplete (a truncated download?)"


# --- reading ---------------------------------------------------------------------------------


def _blob_array(blob: Any, where: str) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # legacy files: always 4-D, e.g. a bias as (1, 1, 1, N)
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if len(blob.data) and len(blob.double_data):
        raise ValueError(f"{where}: both float and double data")
    data = blob.data if len(blob.data) else blob.double_data
    arr = np.asarray(data, dtype=np.float32)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(
            f"{where}: shape {shape} needs {int(np.prod(shape))} values, found {arr.size}"
        )
    return arr.reshape(shape)


def file_label(path: str | os.PathLike, expected_size: int | None = None) -> str:
    """How errors name a weights file: `<path> (<size> bytes[, expected <n>])`."""
    size = Path(path).stat().st_size
    return f"{path} ({size} bytes" + (f", expected {expected_size}" if expected_size else "") + ")"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`. EOFError: the data ends inside it;
    ValueError: longer than protobuf's 10 bytes."""
    value = 0
    for i, byte in enumerate(data[pos : pos + 10]):
        value |= (byte & 0x7F) << 7 * i
        if not byte & 0x80:
            return value, pos + i + 1
    if len(data) - pos < 10:
        raise EOFError
    raise ValueError(f"byte {pos}: a varint of more than 10 bytes")


def _why_unparsable(data: bytes) -> str:
    """Why protobuf refused `data`, from a walk over NetParameter's top-level fields: each is a
    varint or a length-delimited field of `_NET_FIELDS`; a truncated file ends inside one."""
    pos = n = 0
    while pos < len(data):
        start, n = pos, n + 1
        try:
            tag, pos = _varint(data, pos)
            field, wire = tag >> 3, tag & 7
            if field not in _NET_FIELDS or wire not in (0, 2):
                raise ValueError(f"byte {start}: field {field}, wire type {wire}")
            value, pos = _varint(data, pos)
            pos += value if wire == 2 else 0
            if pos > len(data):
                raise EOFError
        except ValueError as e:
            return f"not a Caffe NetParameter protobuf ({e})"
        except EOFError:
            where = f"top-level field #{n}, from byte {start}"
            return f"the file ends inside a field ({where}): it {_LOOKS_TRUNCATED}"
    return "its top-level fields are complete but one is damaged inside (a corrupted file?)"


def read_caffemodel(
    path: str | os.PathLike, *, expected_size: int | None = None
) -> dict[str, list[np.ndarray]]:
    """{layer name: its blobs, in Caffe's order (weight, then bias)} of a `.caffemodel`.

    Arrays are float32 in the blob's own shape (legacy 4-D files: (num, channels, height,
    width)). Layers without blobs (ReLU, Pooling, Crop, ...) map to [], in file order. Reads
    both `layer` (field 100) and the older V1 `layers` (field 2). `expected_size` (bytes, when
    the caller knows the file's published size) is checked before anything is parsed.

    Raises FileNotFoundError, or ValueError naming the path and its size (and the expected
    size) for: a size other than `expected_size`; an empty file or one that ends inside a field
    ("looks incomplete (a truncated download?)"); bytes that are not a NetParameter; a layer
    named twice; a blob whose data does not fill its shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caffemodel not found")
    label = file_label(path, expected_size)
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        why = _LOOKS_TRUNCATED if size < expected_size else "is larger"
        raise ValueError(f"{label}: the file {why}: not the expected caffemodel")
    if size == 0:
        raise ValueError(f"{label}: the file is empty: it {_LOOKS_TRUNCATED}")
    data = path.read_bytes()
    net = NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"{label}: {_why_unparsable(data)} [protobuf: {e}]") from None
    layers = list(net.layer) + list(net.layers)
    if not layers:
        raise ValueError(f"{label}: no layers (neither `layer` nor V1 `layers`): not a caffemodel?")
    out: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        if layer.name in out:
            raise ValueError(f"{path}: layer {layer.name!r} appears twice")
        out[layer.name] = [
            _blob_array(b, f"{path}: layer {layer.name!r} blob {i}")
            for i, b in enumerate(layer.blobs)
        ]
    return out


def truncation_hint(blobs: Mapping[str, Sequence[Any]], expected: Sequence[str]) -> str | None:
    """The sentence saying a file looks truncated, else None: when the layers of `expected` in
    `blobs` (a file's layers, in file order) are its first k, 0 < k < len(expected), and no
    layer with weights follows them (another net, e.g. FCN-16s read as FCN-8s, has more).

    A file cut right after a complete layer parses (protobuf has no end marker) and only
    shows as missing layers: the ones at the end of the net.
    """
    names, wanted = list(blobs), set(expected)
    found = [n for n in names if n in wanted]
    k = len(found)
    if not (0 < k < len(expected) and found == list(expected[:k])):
        return None
    if any(blobs[n] for n in names[names.index(found[-1]) + 1 :]):
        return None
    return (
        f"the file holds the first {k} of the {len(expected)} weight layers in order and "
        f"nothing after {found[-1]!r}: it looks truncated (an incomplete download?)"
    )


def write_caffemodel(
    path: str | os.PathLike, blobs: dict[str, list[np.ndarray]], *, v1: bool = False
) -> None:
    """Write `blobs` as a `.caffemodel` (the inverse of `read_caffemodel`), with this schema.

    `v1=True` uses the V1 `layers` field and legacy 4-D blob shapes, as pre-2015 Caffe did.
    For tests and for re-exporting; not atomic.
    """
    net = NetParameter(name="fcn")
    for name, arrays in blobs.items():
        layer = net.layers.add(name=name) if v1 else net.layer.add(name=name)
        for a in arrays:
            a = np.asarray(a, dtype=np.float32)
            blob = layer.blobs.add()
            if v1:
                if a.ndim > 4:
                    raise ValueError(f"{name}: a legacy blob has at most 4 axes, got {a.shape}")
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - a.ndim) + a.shape
            else:
                blob.shape.dim.extend(a.shape)
            blob.data.extend(a.ravel().tolist())
    Path(path).write_bytes(net.SerializeToString())


def blob_fits(found: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether a blob of shape `found` holds a parameter of shape `want`: the same shape, or a
    legacy 4-D blob with leading 1s (Caffe's own loader accepts (1, 1, 1, N) for (N,))."""
    return found == want or (
        len(found) == 4 and len(want) < 4 and found == (1,) * (4 - len(want)) + want
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def caffe_layer_names() -> dict[str, str]:
    """{Caffe layer name: module name} of the VGG16 convs: conv1_1 -> features.0, ..."""
    names, block, i = [], 1, 1
    for v in VGG16_CFG:
        if v == "M":
            block, i = block + 1, 1
        else:
            names.append(f"conv{block}_{i}")
            i += 1
    return {n: f"features.{idx}" for n, idx in zip(names, VGG16_CONV_INDICES, strict=True)}
