"""Each COCO annotation checked: skipped and counted when malformed, repaired when it can be.

Two phases, because in COCO files "categories" follows "annotations": `compact_annotation`
runs while parsing (checks that need no image or category), `finish_annotation` once `images`
and `categories` are known (ids, image size, the order of `SKIP_REASONS`). A missing `iscrowd`
means 0, as in pycocotools (`COCOeval` reads `'iscrowd' in gt and gt['iscrowd']`; exporters
often omit it).

An object of a VOC class is never turned into background because its segmentation is partly or
wholly unusable (detectron2 and mmdetection drop bad polygon parts the same way):

- a polygon part with fewer than 3 points, a non-finite or non-numeric coordinate, or every
  point outside the image is dropped and the other parts are rasterized (counted per reason in
  `voc_objects_parts_dropped_by_reason`);
- when nothing valid is left (every part dropped, an empty or missing `segmentation`, an RLE of
  another size than the image), the object's region - its `bbox`, or failing that the bounding
  box of its finite polygon coordinates - is marked 255 (ignore), counted per reason in
  `voc_objects_marked_ignore_by_reason`; an image with such an object and no region at all is
  dropped (`voc_object_without_region`): nobody can say where the object is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.classes import COCO_TO_VOC
from pipeline.data.coco_json import is_int

# Why an annotation is skipped (the first failing check wins, in this order).
SKIP_MALFORMED = "malformed_annotation"  # not a dict, or id/image_id/category_id/iscrowd bad
SKIP_UNKNOWN_IMAGE = "unknown_image_id"  # image_id not in `images`


SKIP_IMAGE_MISSING = "image_missing_from_zip"  # its image file is not in the images zip
SKIP_UNKNOWN_CATEGORY = "unknown_category_id"  # category_id not in `categories`


SKIP_NO_SEGMENTATION = "no_segmentation"  # bbox-only: segmentation missing/null/empty
SKIP_SHORT_POLYGON = "polygon_under_3_points"  # pycocotools reads a 4-number polygon as a bbox


SKIP_BAD_SEGMENTATION = "bad_segmentation"  # wrong types, NaN, far off-image, RLE size/sum wrong
SKIP_OFF_IMAGE = "polygon_off_image"  # every point of the part outside the image


SKIP_REASONS = (
    SKIP_MALFORMED,
    SKIP_UNKNOWN_IMAGE,
    SKIP_IMAGE_MISSING,
    SKIP_UNKNOWN_CATEGORY,
    SKIP_NO_SEGMENTATION,
    SKIP_SHORT_POLYGON,
    SKIP_BAD_SEGMENTATION,
    SKIP_OFF_IMAGE,
)


# Why (part of) the segmentation of a VOC-class object is unusable: parts dropped, or the object
# marked ignore when nothing is left. The same words as the skip reasons.
SEGMENTATION_REASONS = (
    SKIP_NO_SEGMENTATION,
    SKIP_SHORT_POLYGON,
    SKIP_BAD_SEGMENTATION,
    SKIP_OFF_IMAGE,
)


def _rle_string_counts(s: bytes) -> list[int]:
    """Decode COCO's compressed RLE string (maskApi.c rleFrString) to run lengths.

    Only used to validate: pycocotools' C decoder writes past its buffer when the runs do not
    add up to h*w, so an RLE from the file is checked before it reaches the C code.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {chr(s[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _parse_part(p: Any) -> tuple[str | None, np.ndarray | None]:
    """One polygon part: (reason, None) or (None, float64 array of x, y pairs)."""
    if not isinstance(p, list):
        return SKIP_BAD_SEGMENTATION, None
    if len(p) < 6:
        return SKIP_SHORT_POLYGON, None
    if len(p) % 2:
        return SKIP_BAD_SEGMENTATION, None
    try:
        arr = np.array(p, dtype=np.float64)
    except (TypeError, ValueError):
        return SKIP_BAD_SEGMENTATION, None
    if arr.ndim != 1 or not np.isfinite(arr).all():
        return SKIP_BAD_SEGMENTATION, None
    return None, arr


def _parse_segmentation(segm: Any) -> tuple[str | None, Any, tuple[str, ...]]:
    """Phase 1 of one segmentation: (reason, None, dropped) or (None, parsed, dropped).

    parsed: (payload, size check). payload: a list of float64 polygon arrays (the valid parts),
    ("u", counts list) or ("c", counts bytes); size check: ("extent", max |coordinate|) or
    ("rle", size, sum of runs). dropped: the reason of each polygon part left out; when no part
    is valid the reason is the first part's.
    """
    if segm is None or (isinstance(segm, list | dict) and not segm):
        return SKIP_NO_SEGMENTATION, None, ()
    if isinstance(segm, list):
        polys, dropped, extent = [], [], 0.0
        for p in segm:
            reason, arr = _parse_part(p)
            if reason is not None:
                dropped.append(reason)
                continue
            extent = max(extent, float(np.abs(arr).max()))
            polys.append(arr)
        if not polys:
            return dropped[0], None, tuple(dropped)
        return None, (polys, ("extent", extent)), tuple(dropped)
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
            return SKIP_BAD_SEGMENTATION, None, ()
        if isinstance(counts, list):  # uncompressed RLE (COCO's crowd annotations)
            if not counts or not all(is_int(c) and c >= 0 for c in counts):
                return SKIP_BAD_SEGMENTATION, None, ()
            return None, (("u", counts), ("rle", size, sum(counts))), ()
        if isinstance(counts, str | bytes):  # compressed RLE
            data = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
            try:
                runs = _rle_string_counts(data)
            except ValueError:
                return SKIP_BAD_SEGMENTATION, None, ()
            if any(r < 0 for r in runs):
                return SKIP_BAD_SEGMENTATION, None, ()
            return None, (("c", data), ("rle", size, sum(runs))), ()
    return SKIP_BAD_SEGMENTATION, None, ()


def _fit_part(arr: np.ndarray, h: int, w: int) -> str | None:
    """Why a parsed polygon part cannot be rasterized on an (h, w) image, or None."""
    xs, ys = arr[0::2], arr[1::2]
    if xs.max() <= 0 or xs.min() >= w or ys.max() <= 0 or ys.min() >= h:
        return SKIP_OFF_IMAGE  # covers no pixel
    if float(np.abs(arr).max()) > 4 * max(h, w):
        return SKIP_BAD_SEGMENTATION  # rleFrPoly allocates per edge length: far coordinates
    return None


def _fit_segmentation(parsed: tuple, h: int, w: int) -> tuple[str | None, Any, tuple[str, ...]]:
    """Phase 2 of one segmentation: check it against the image size; rasterizer-ready form.

    Returns (reason, None, dropped) or (None, ready, dropped). Ready: a list of float64 polygon
    arrays (the parts that fit), or a compressed RLE dict {"size", "counts"}; None for a non-VOC
    annotation (checked, never rasterized).
    """
    payload, check = parsed
    if check[0] == "extent":
        if payload is None:  # non-VOC: only the whole extent is checked
            return (
                (SKIP_BAD_SEGMENTATION, None, ()) if check[1] > 4 * max(h, w) else (None, None, ())
            )
        kept, dropped = [], []
        for arr in payload:
            reason = _fit_part(arr, h, w)
            if reason is None:
                kept.append(arr)
            else:
                dropped.append(reason)
        if not kept:
            return dropped[0], None, tuple(dropped)
        return None, kept, tuple(dropped)
    _, size, total = check
    if size != [h, w] or total != h * w:  # another image's RLE, or runs that overflow the mask
        return SKIP_BAD_SEGMENTATION, None, ()
    if payload is None:  # a non-VOC annotation: checked, never rasterized
        return None, None, ()
    kind, counts = payload
    if kind == "u":
        counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
    return None, {"size": [h, w], "counts": counts}, ()


def prepare_segmentation(segm: Any, h: int, w: int) -> tuple[str | None, Any]:
    """(skip reason, None) or (None, rasterizer-ready segmentation) of one `segmentation` on an
    (h, w) image: both phases at once, for a single annotation."""
    reason, parsed, _ = _parse_segmentation(segm)
    return (reason, None) if reason else _fit_segmentation(parsed, h, w)[:2]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


def _region_box(ann: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) where a VOC object whose segmentation is unusable lies, or None.

    COCO's `bbox` ([x, y, width, height], positive sizes) when valid; otherwise the bounding box
    of the finite coordinate pairs of its polygon parts, when that has an area.
    """
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox):
        x, y, bw, bh = (float(v) for v in bbox)
        if bw > 0 and bh > 0:
            return x, y, x + bw, y + bh
    segm = ann.get("segmentation")
    xs: list[float] = []
    ys: list[float] = []
    if isinstance(segm, list):
        for p in segm:
            if not isinstance(p, list):
                continue
            for x, y in zip(p[0::2], p[1::2], strict=False):
                if _is_number(x) and _is_number(y):
                    xs.append(float(x))
                    ys.append(float(y))
    if xs and max(xs) > min(xs) and max(ys) > min(ys):
        return min(xs), min(ys), max(xs), max(ys)
    return None


def _region_polygons(box: tuple[float, float, float, float], h: int, w: int) -> list[np.ndarray]:
    """The box clipped to the image as one rectangle polygon (pycocotools' frBbox shape), or
    [] when it lies outside the image."""
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[2], float(w)), min(box[3], float(h))
    if x1 <= x0 or y1 <= y0:
        return []
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], np.float64)]


def compact_annotation(ann: Any, index: int) -> tuple:
    """Phase 1, run as each annotation is parsed: (id, image_id, category_id, iscrowd,
    reason or None, parsed segmentation, dropped part reasons, region box or None). Only VOC
    classes keep their polygons and region. A missing `iscrowd` is 0 (as in pycocotools)."""
    if not isinstance(ann, dict):
        return (f"annotations[{index}]", None, None, 0, SKIP_MALFORMED, None, (), None)
    ident = ann.get("id")
    ident = ident if is_int(ident) or isinstance(ident, str) else f"annotations[{index}]"
    image_id, cat, crowd = ann.get("image_id"), ann.get("category_id"), ann.get("iscrowd", 0)
    if not (is_int(image_id) and is_int(cat) and crowd in (0, 1)):
        return (ident, None, None, 0, SKIP_MALFORMED, None, (), None)
    reason, parsed, dropped = _parse_segmentation(ann.get("segmentation"))
    box = None
    if not voc_class(cat):
        if parsed is not None:
            parsed = (None, parsed[1])  # never rasterized: keep the size check only
    else:  # phase 2 may still find the segmentation unusable (off the image, RLE size)
        box = _region_box(ann)
    return (ident, image_id, cat, int(crowd), reason, parsed, dropped, box)


def finish_annotation(
    rec: tuple,
    image_sizes: Mapping[int, tuple[int, int]],
    category_ids: set[int] | frozenset[int],
    missing_images: set[int] | frozenset[int],
) -> tuple[str | None, Any, str | None, tuple[str, ...]]:
    """Phase 2: (skip reason, ready segmentation, ignore reason, dropped part reasons).

    - skipped: (reason, None, None, ());
    - usable: (None, ready segmentation (None for non-VOC classes), None, dropped parts);
    - a VOC-class object whose segmentation is unusable: (None, region, reason, dropped), the
      region being rectangle polygons to mark ignore ([] if off the image), or None when the
      annotation gives no region at all.
    """
    _ident, image_id, cat, _crowd, reason, parsed, dropped, box = rec
    if reason == SKIP_MALFORMED:
        return reason, None, None, ()
    size = image_sizes.get(image_id)
    if size is None:
        return SKIP_UNKNOWN_IMAGE, None, None, ()
    if image_id in missing_images:
        return SKIP_IMAGE_MISSING, None, None, ()
    if cat not in category_ids:
        return SKIP_UNKNOWN_CATEGORY, None, None, ()
    if reason is None:
        reason, seg, more = _fit_segmentation(parsed, *size)
        dropped = dropped + more
        if reason is None:
            return None, seg, None, dropped
    if not voc_class(cat):
        return reason, None, None, ()
    region = None if box is None else _region_polygons(box, *size)
    return None, region, reason, dropped


def validate_annotation(
    ann: Any,
    image_sizes: Mapping[int, tuple[int, int]],
    category_ids: Iterable[int],
    missing_images: Iterable[int] = (),
) -> str | None:
    """Why `ann` cannot be rasterized (one of `SKIP_REASONS`, the first that applies), or None.

    A VOC-class object with such a reason is marked ignore by the converter rather than
    skipped; a segmentation with at least one usable polygon part is usable (None).
    `image_sizes` maps image id -> (height, width); `missing_images` are ids whose file is not
    in the images zip.
    """
    cats = category_ids if isinstance(category_ids, set | frozenset) else set(category_ids)
    missing = missing_images if isinstance(missing_images, set | frozenset) else set(missing_images)
    skip, _seg, ignore, _dropped = finish_annotation(
        compact_annotation(ann, 0), image_sizes, cats, missing
    )
    return skip or ignore


def voc_class(category_id: int) -> int:
    """VOC class index 1..20 of a COCO category, 0 (background) for the other 60."""
    return COCO_TO_VOC.get(category_id, 0)
