"""One image/label pair made into a record: decode, resize, check and encode.

Paper ideas, each in one function: `target_size` (keep aspect, never upscale), `resize_image`
(bilinear + antialias), `resize_label` (nearest only: an interpolated label map invents classes
at every boundary), `check_label_values` (0..20 and 255 only).

Decoding dominates the cost (about 80% of it), so `decode_resized` decodes JPEGs with
libjpeg-turbo (simplejpeg) straight into an interleaved RGB array, shrinking by 1/2, 1/4 or 1/8
inside the IDCT where the target allows it (`jpeg_scale_denominator`, what PIL's `draft` does),
and resizes that array as it lies (channels-last) with torch's uint8 antialiased kernel; the
same libjpeg-turbo encodes the result without a layout copy. A training image that needs no
resize and already is a 3-channel JPEG is stored as its original bytes (re-encoding would only
add JPEG loss), after a 1/8-scale decode that still entropy-decodes, and so checks, every byte
of it. An unusable pair raises `BadSample` naming the member.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.data.datasets import decode_image_rgb, decode_label

_VALID = torch.zeros(256, dtype=torch.bool)  # label values a VOC label map may hold
_VALID[:NUM_CLASSES] = True
_VALID[IGNORE_INDEX] = True


class BadSample(ValueError):
    """One input pair is unusable; it is skipped and counted toward `max_bad_fraction`."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member, self.reason = member, reason


def target_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the longer side <= max_size and the aspect ratio kept; never upscales."""
    if height < 1 or width < 1 or max_size < 1:
        raise ValueError(f"bad size {height}x{width} or max_size {max_size}")
    longer = max(height, width)
    if longer <= max_size:
        return height, width
    s = max_size / longer
    return max(1, round(height * s)), max(1, round(width * s))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 RGB [3, H, W] -> [3, h, w], bilinear with antialiasing (no aliasing when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 class map [H, W] -> [h, w] by nearest neighbour: every output value is an input value.

    NEAREST_EXACT samples at pixel centres, like the bilinear image resize, so image and label
    stay aligned (legacy NEAREST shifts the map by up to half a pixel).
    """
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.resize(label[None], list(size), interpolation=InterpolationMode.NEAREST_EXACT)[0]


def check_label_values(label: Tensor, name: str) -> None:
    """BadSample naming `name` and the offending values unless all are in 0..20 or 255."""
    present = torch.bincount(label.reshape(-1).to(torch.int64), minlength=256) > 0
    bad = (present & ~_VALID).nonzero().flatten().tolist()
    if bad:
        raise BadSample(name, f"label values outside 0..{NUM_CLASSES - 1}/{IGNORE_INDEX}: {bad}")


def jpeg_scale_denominator(height: int, width: int, size: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 by which a JPEG can shrink while it decodes and still cover `size`.

    libjpeg-turbo scales in the IDCT: a 1/2 decode computes a 4x4 IDCT of each block's low
    frequencies, a band-limited (alias-free) downsample for a fraction of the work. Only powers
    of two: its 3/4, 5/8 ... kernels have no SIMD and decode slower than full size. Never below
    `size`, so the final antialiased resize only shrinks.
    """
    denominator = 1
    while denominator < 8:
        d = 2 * denominator
        if -(-height // d) < size[0] or -(-width // d) < size[1]:
            break
        denominator = d
    return denominator


def decode_resized(data: bytes, name: str, max_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Decode image bytes to RGB resized so the longer side is <= max_size; also its stored (H, W).

    JPEGs in YCbCr, RGB or grayscale go through `jpeg_scale_denominator` and a channels-last
    `resize_image` (the result is a [3, h, w] view of an [h, w, 3] array). Everything else - PNG,
    CMYK/YCCK JPEG, and any JPEG libjpeg-turbo's strict mode refuses - takes the
    `decode_image_rgb` path, which accepts what it always accepted and names the file in a
    BadSample when the data is really broken.
    """
    header = _jpeg_header(data)
    if header is not None:
        height, width, _ = header
        size = target_size(height, width, max_size)
        d = jpeg_scale_denominator(height, width, size)
        try:
            array = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=-(-height // d), min_width=-(-width // d)
            )
        except ValueError:
            pass  # warnings are errors in strict mode: let decode_image_rgb decide, as before
        else:
            return resize_image(torch.from_numpy(array).permute(2, 0, 1), size), (height, width)
    image = _decode_image(data, name)
    height, width = image.shape[1:]
    return resize_image(image, target_size(height, width, max_size)), (height, width)


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(height, width, colorspace) of a JPEG that libjpeg-turbo turns into RGB itself, else None."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width, colorspace) if colorspace in _RGB_ABLE else None


_RGB_ABLE = ("YCbCr", "RGB", "Gray")  # CMYK/YCCK: decode_image_rgb inverts Adobe CMYK


_PASS_THROUGH = ("YCbCr", "RGB")  # 3-component JPEGs: stored as they are when not resized


def encode_image_jpeg(image: Tensor, quality: int) -> bytes:
    """uint8 RGB [3, h, w] -> JPEG (4:2:0, the libjpeg default); no copy if channels-last."""
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return simplejpeg.encode_jpeg(hwc, quality=quality, colorspace="RGB", colorsubsampling="420")


def encode_label_png(label: Tensor) -> bytes:
    """uint8 class map [H, W] -> one-channel 8-bit PNG (mode L): class ids as they are, no palette.

    Pillow's encoder at zlib level 6 (adaptive row filters), what torchvision's libpng encoder
    did: as fast, within a few per cent of its size (benchmarks/bench_decode.py).
    """
    if label.dtype != torch.uint8 or label.ndim != 2:
        raise ValueError(f"label map must be 2-D uint8, got {label.dtype} {tuple(label.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label.numpy())).save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _decode_image(data: bytes, name: str) -> Tensor:
    try:
        return decode_image_rgb(data, name)
    except ValueError as e:
        raise BadSample(name, str(e).removeprefix(f"{name}: ")) from None


def _decode_label(data: bytes, name: str) -> Tensor:
    try:
        label = decode_label(data, name)
    except ValueError as e:
        raise BadSample(name, str(e).removeprefix(f"{name}: ")) from None
    check_label_values(label, name)
    return label


def prepare_image(data: bytes, name: str, *, max_size: int, jpeg_quality: int) -> bytes:
    """One training image: decode to RGB, resize (longer side <= max_size), encode JPEG."""
    return _train_image(data, name, max_size, jpeg_quality)[0]


def _train_image(
    data: bytes, name: str, max_size: int, jpeg_quality: int
) -> tuple[bytes, tuple[int, int]]:
    """The stored bytes of a training image and the input's (H, W)."""
    header = _jpeg_header(data)
    fits = header is not None and header[2] in _PASS_THROUGH and max(header[:2]) <= max_size
    if fits and _decodes_at_one_eighth(data):
        return bytes(data), header[:2]  # type: ignore[index]
    image, stored_size = decode_resized(data, name, max_size)
    return encode_image_jpeg(image, jpeg_quality), stored_size


def _image_size(data: bytes, name: str) -> tuple[int, int]:
    """(H, W) of an image that decodes completely; BadSample naming `name` if it does not."""
    header = _jpeg_header(data)
    if header is not None and _decodes_at_one_eighth(data):
        return header[:2]
    return tuple(_decode_image(data, name).shape[1:])  # type: ignore[return-value]


def _decodes_at_one_eighth(data: bytes) -> bool:
    # a 1/8 decode entropy-decodes every byte (a truncated or corrupt stream fails as it would at
    # full size) but its IDCT is one coefficient per block: a validity check at ~1/4 of the cost
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=1, min_width=1)
    except ValueError:
        return False
    return True


def _check_pair_size(
    image_size: tuple[int, int], image_name: str, label: Tensor, label_name: str
) -> None:
    if tuple(image_size) != tuple(label.shape):
        (h, w), (lh, lw) = image_size, label.shape
        raise BadSample(label_name, f"label is {lw}x{lh} but its image {image_name} is {w}x{h}")


def prepare_train_pair(
    image_bytes: bytes,
    label_bytes: bytes,
    *,
    image_name: str,
    label_name: str,
    max_size: int,
    jpeg_quality: int,
    source: str,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A training record: resized RGB JPEG + resized mode-L PNG label; BadSample if unusable."""
    image, stored_size = _train_image(image_bytes, image_name, max_size, jpeg_quality)
    label = _decode_label(label_bytes, label_name)
    _check_pair_size(stored_size, image_name, label, label_name)
    size = target_size(*label.shape, max_size)
    blobs = {"image": image, "label": encode_label_png(resize_label(label, size))}
    return blobs, {"height": size[0], "width": size[1], "source": source}


def prepare_val_pair(
    image_bytes: bytes, label_bytes: bytes, *, image_name: str, label_name: str, source: str
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """An evaluation record: the original bytes, checked to decode and to hold valid labels."""
    image_size = _image_size(image_bytes, image_name)
    label = _decode_label(label_bytes, label_name)
    _check_pair_size(image_size, image_name, label, label_name)
    meta = {"height": int(label.shape[0]), "width": int(label.shape[1]), "source": source}
    return {"image": bytes(image_bytes), "label": bytes(label_bytes)}, meta
