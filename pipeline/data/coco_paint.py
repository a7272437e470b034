"""The VOC rules painted: COCO segmentations -> one VOC label map (uint8) and its PNG.

- a pixel inside any crowd (`iscrowd=1`) annotation of a VOC class is 255 (ignore);
- a pixel inside non-crowd instances of two different VOC classes is 255 (ambiguous);
- otherwise it is the VOC class of the non-crowd instance(s) covering it;
- otherwise 0: background, objects of the other 60 COCO categories included (as in VOC).

One union per class per image is rasterized with pycocotools.mask (frPyObjects + merge + decode
instead of one decode per instance); `convert_task` is what the coco_to_voc workers run.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.classes import IGNORE_INDEX
from pipeline.data.coco_annotations import (
    compact_annotation,
    finish_annotation,
    prepare_segmentation,
    voc_class,
)

CROWD = IGNORE_INDEX  # group key of the crowd union in a per-image task


PNG_ZLIB_LEVEL = 1


def union_rle(segms: Sequence[Any], h: int, w: int) -> dict:
    """One RLE for the union of prepared segmentations (polygon lists and RLE dicts)."""
    rles: list[dict] = []
    polys: list[np.ndarray] = []
    for s in segms:
        if isinstance(s, dict):
            rles.append(s)
        else:
            polys.extend(s)
    if polys:  # one frPyObjects call for every polygon of the group
        rles.extend(mask_utils.frPyObjects(polys, h, w))
    return rles[0] if len(rles) == 1 else mask_utils.merge(rles)


def rasterize_annotation(ann: Mapping[str, Any], h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of one annotation: polygons, uncompressed or compressed RLE."""
    reason, prepared = prepare_segmentation(ann.get("segmentation"), h, w)
    if reason is not None:
        raise ValueError(f"annotation {ann.get('id')!r}: cannot rasterize ({reason})")
    return mask_utils.decode(union_rle([prepared], h, w)).astype(bool)


def apply_voc_rules(
    class_masks: Sequence[tuple[int, np.ndarray]], crowd: np.ndarray | None
) -> np.ndarray:
    """Combine per-class union masks (0/1 uint8, same shape) into a uint8 VOC label map.

    Exactly one class -> that class; two or more classes -> 255; inside a VOC crowd -> 255;
    nothing -> 0. Plain arithmetic (no boolean-mask assignment): class sums wrap harmlessly in
    uint8 because every pixel covered twice is overwritten with 255 afterwards.
    """
    if not class_masks and crowd is None:
        raise ValueError("apply_voc_rules needs at least one mask to know the shape")
    shape = class_masks[0][1].shape if class_masks else crowd.shape
    label = np.zeros(shape, np.uint8)
    if len(class_masks) == 1:
        cls, m = class_masks[0]
        np.multiply(m, np.uint8(cls), out=label)
        ignore = None
    elif class_masks:
        count = np.zeros(shape, np.uint8)
        tmp = np.empty(shape, np.uint8)
        for cls, m in class_masks:
            np.multiply(m, np.uint8(cls), out=tmp)
            label += tmp
            count += m
        ignore = np.greater(count, 1).view(np.uint8)
    else:
        ignore = None
    if crowd is not None:
        ignore = crowd if ignore is None else np.bitwise_or(ignore, crowd)
    if ignore is not None:
        np.maximum(label, ignore * np.uint8(IGNORE_INDEX), out=label)
    return label


def voc_pixel_count(label: np.ndarray) -> int:
    """Pixels of classes 1..20 (neither background nor ignore)."""
    return int(np.count_nonzero(label) - np.count_nonzero(label == IGNORE_INDEX))


def keep_image(voc_pixels: int, min_pixels: int) -> bool:
    """The drop rule: an image needs at least `min_pixels` pixels of VOC classes."""
    return voc_pixels >= min_pixels


def group_by_class(anns_prepared: Iterable[tuple[int, int, Any]]) -> dict[int, list]:
    """(category_id, iscrowd, prepared segmentation) -> {voc class or CROWD: [segmentations]}."""
    groups: dict[int, list] = {}
    for cat, crowd, seg in anns_prepared:
        cls = voc_class(cat)
        if cls:
            groups.setdefault(CROWD if crowd else cls, []).append(seg)
    return groups


def label_map_from_rles(rles: Mapping[int, dict], h: int, w: int) -> np.ndarray:
    """Label map (h, w) from one union RLE per group (one decode each), Fortran-ordered.

    pycocotools decodes column-major (h, w) masks; the rules run on their C-contiguous (w, h)
    transposes and the result is handed back as a transposed view, so the one unavoidable
    row-major copy happens where the PNG rows are built.
    """
    if not rles:
        return np.zeros((h, w), np.uint8)
    stack = mask_utils.decode(list(rles.values()))  # (h, w, n) Fortran-ordered, one call
    decoded = {key: stack[:, :, i].T for i, key in enumerate(rles)}
    crowd = decoded.pop(CROWD, None)
    return apply_voc_rules(sorted(decoded.items()), crowd).T


def voc_label_map(anns: Iterable[Mapping[str, Any]], h: int, w: int) -> np.ndarray:
    """The VOC label map (h, w) uint8 of one image's COCO annotations (the rules above).

    `image_id` is not needed. Unusable polygon parts are dropped; a VOC-class object with no
    usable segmentation marks its region 255. Raises ValueError for a malformed annotation
    (the stage skips those before this point) and for a VOC-class object with neither a usable
    segmentation nor a region (the stage drops such an image).
    """
    prepared = []
    for i, ann in enumerate(anns):
        rec = compact_annotation({**ann, "image_id": 0}, i)
        skip, seg, ignore, _dropped = finish_annotation(rec, {0: (h, w)}, {rec[2]}, frozenset())
        if skip is not None:
            raise ValueError(f"annotation {ann.get('id')!r}: cannot rasterize ({skip})")
        if ignore is not None:
            if seg is None:
                raise ValueError(f"annotation {ann.get('id')!r}: {ignore} and no region (bbox)")
            if seg:
                prepared.append((rec[2], 1, seg))
            continue
        prepared.append((rec[2], rec[3], seg))
    groups = group_by_class(prepared)
    rles = {k: union_rle(v, h, w) for k, v in groups.items()}
    return np.ascontiguousarray(label_map_from_rles(rles, h, w))


def encode_label_png(label: np.ndarray) -> bytes:
    """8-bit greyscale ("L") PNG of a label map; deterministic.

    Written by hand instead of PIL: PIL tries all five PNG row filters on every row of an "L"
    image (2/3 of its time, useless for label maps), while unfiltered rows + zlib's run-length
    strategy is ~3x faster and smaller. Any PNG reader (PIL, torchvision) decodes it.
    """
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label map must be 2-D uint8, got {label.dtype} {label.shape}")
    h, w = label.shape
    raw = np.empty((h, w + 1), np.uint8)
    raw[:, 0] = 0  # filter type "None" for every row
    raw[:, 1:] = label
    z = zlib.compressobj(PNG_ZLIB_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(raw.data) + z.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def convert_task(task: tuple, min_pixels: int) -> tuple[bytes | None, int]:
    """Worker: (key, h, w, groups) -> (PNG bytes, or None if dropped; VOC pixel count)."""
    key, h, w, groups = task
    try:
        rles = {k: union_rle(segms, h, w) for k, segms in groups.items()}
        if min_pixels > 0:
            # the class areas bound the VOC pixels from above: drop without decoding or PNG
            bound = sum(int(mask_utils.area(r)) for k, r in rles.items() if k != CROWD)
            if not keep_image(bound, min_pixels):
                return None, bound
        label = label_map_from_rles(rles, h, w)
        voc_pixels = voc_pixel_count(label)
        if not keep_image(voc_pixels, min_pixels):
            return None, voc_pixels
        return encode_label_png(label), voc_pixels
    except Exception as e:  # name the image: a bare pycocotools error says nothing
        raise RuntimeError(f"image {key!r} ({h}x{w}): {type(e).__name__}: {e}") from e


def label_png_to_array(png: bytes) -> np.ndarray:
    """Decode a stored label PNG back to (h, w) uint8 (for readers and tests)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        if im.mode != "L":
            raise ValueError(f"label PNG has mode {im.mode!r}, expected 'L'")
        return np.asarray(im, dtype=np.uint8).copy()
