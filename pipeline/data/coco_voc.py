"""COCO 2017 instance annotations -> VOC-style semantic label maps (the coco_to_voc stage).

The paper trains on VOC; more data helps, so COCO objects of the 20 VOC classes are turned into
VOC label maps. The rules, each a small named function below:

- a pixel inside any crowd (`iscrowd=1`) annotation of a VOC class is 255 (ignore);
- a pixel inside non-crowd instances of two different VOC classes is 255 (ambiguous);
- otherwise it is the VOC class of the non-crowd instance(s) covering it;
- otherwise 0: background, objects of the other 60 COCO categories included (as in VOC);
- images with fewer than `min_pixels` pixels of classes 1..20 are dropped.

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

A missing `iscrowd` means 0, as in pycocotools (`COCOeval` reads `'iscrowd' in gt and
gt['iscrowd']`; exporters often omit it). Category ids are trusted only after the names of the
20 mapped ids in the file's `categories` are checked against COCO's (`pipeline.classes`).

Scale (train2017: 118k images, 860k annotations, a ~450 MB JSON). The parent process parses
the JSON once, streaming the "annotations" array element by element (`_parse_streaming`):
each annotation is checked and reduced at once to a compact record (VOC-class polygons as
float64 arrays, RLEs as counts; the rest only its ids), so the 860k dicts never coexist.
After the checks that need `images`/`categories` (`plan_split`), records are grouped into one
task per image. Workers (spawned: a fresh interpreter, none of the parent's memory) rasterize
one union per class per image with pycocotools.mask (frPyObjects + merge + decode instead of
one decode per instance), apply the rules and encode the PNG; the parent writes records in
input order, so the output is deterministic and independent of `workers`.

Peak memory: the JSON text twice while it is read and decoded (bytes + str, ~1.1 GB for 530
MB), then the text + compact records (~1 GB), plus ~70 MB per worker; whole-file json.load
would need ~3.6 GB (benchmarks/bench_coco_voc.py). Results stream to the shard files; the
pool's pipes bound the work in flight.

Malformed annotations are skipped and counted with their ids (`SKIP_*` reasons); a file that is
not JSON or lacks `images`/`annotations`/`categories` raises `CocoFormatError`, and so does a
split where more than `max_rejected_fraction` of the annotations are rejected (skipped or
marked ignore) or of the images are dropped for a fault (`CocoRejectedError`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import multiprocessing as mp
import os
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pipeline.classes import COCO_NAMES, COCO_TO_VOC, IGNORE_INDEX, VOC_CLASSES
from pipeline.data.shards import ShardWriter

REQUIRED_KEYS = ("images", "annotations", "categories")
ID_LIST_CAP = 1000  # ids listed per reason in the report; the count is always complete

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
# Why an image is dropped.
DROP_MISSING_FILE = "missing_from_images_zip"
DROP_FEW_PIXELS = "below_min_pixels"
DROP_NO_REGION = "voc_object_without_region"  # unusable segmentation and no bbox
DROP_REASONS = (DROP_MISSING_FILE, DROP_FEW_PIXELS, DROP_NO_REGION)
FAULT_DROPS = (DROP_MISSING_FILE, DROP_NO_REGION)  # drops that count toward the rejected share

CROWD = IGNORE_INDEX  # group key of the crowd union in a per-image task
PNG_ZLIB_LEVEL = 1


class CocoFormatError(ValueError):
    """The annotation file itself is unusable; the message names the file/member and the key."""


class CocoRejectedError(CocoFormatError):
    """Too much of a split was rejected (`max_rejected_fraction`); the message gives the counts."""


# --- loading --------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
AnnotationHook = Callable[[Any, int], Any]


def _read_text(src: str | os.PathLike | bytes | IO[bytes], source_name: str) -> str:
    if isinstance(src, bytes | bytearray):
        raw = bytes(src)
    elif isinstance(src, str | os.PathLike):
        try:
            raw = Path(src).read_bytes()
        except OSError as e:
            raise CocoFormatError(f"{source_name}: cannot read ({e})") from None
    else:
        raw = src.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{source_name}: not JSON (not UTF-8 text: {e})") from None


def _parse_streaming(text: str, hook: AnnotationHook) -> Any:
    """`json.loads`, except that the top-level "annotations" array goes through `hook` element
    by element (`hook(element, index)`), so the ~860k annotation dicts never exist all at once.
    """
    dec = json.JSONDecoder()
    skip = _WS.match

    def expect(i: int, chars: str, what: str) -> tuple[str, int]:
        c = text[i : i + 1]
        if not c or c not in chars:
            raise json.JSONDecodeError(f"Expecting {what}", text, i)
        return c, skip(text, i + 1).end()

    i = skip(text, 0).end()
    if not text.startswith("{", i):
        return json.loads(text)  # not an object: plain parse, the caller reports the type
    out: dict[str, Any] = {}
    i = skip(text, i + 1).end()
    closing = text.startswith("}", i)
    if closing:
        i = skip(text, i + 1).end()
    while not closing:
        if not text.startswith('"', i):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
        key, i = dec.raw_decode(text, i)
        _, i = expect(skip(text, i).end(), ":", "':' delimiter")
        if key == "annotations" and text.startswith("[", i):
            value: Any = []
            i = skip(text, i + 1).end()
            end = text.startswith("]", i)
            if end:
                i += 1
            while not end:
                item, i = dec.raw_decode(text, i)
                value.append(hook(item, len(value)))
                c, i = expect(skip(text, i).end(), ",]", "',' delimiter")
                end = c == "]"
        else:
            value, i = dec.raw_decode(text, i)
        out[key] = value
        c, i = expect(skip(text, i).end(), ",}", "',' delimiter")
        closing = c == "}"
    if i != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return out


def load_instances(
    src: str | os.PathLike | bytes | IO[bytes],
    source_name: str,
    annotation_hook: AnnotationHook | None = None,
) -> dict:
    """Parse a COCO instances JSON (path, bytes or binary file) and check its top-level keys.

    `source_name` (e.g. `annotations_trainval2017.zip:annotations/instances_val2017.json`) is
    what error messages call the file. With `annotation_hook`, `data["annotations"]` holds
    `hook(annotation, index)` of each element instead of the element (the stage keeps compact
    records only: parsing train2017 whole takes ~3 GB, streaming it ~1 GB).
    """
    text = _read_text(src, source_name)
    # the cyclic GC would walk millions of live parsed objects again and again, finding no
    # cycle (JSON has none): pause it while parsing
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        data = (
            json.loads(text) if annotation_hook is None else _parse_streaming(text, annotation_hook)
        )
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{source_name}: not valid JSON ({e})") from None
    finally:
        if gc_was_enabled:
            gc.enable()
    del text
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{source_name}: expected a JSON object with keys {', '.join(REQUIRED_KEYS)}, "
            f"got a JSON {type(data).__name__}"
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise CocoFormatError(
                f"{source_name}: missing required key {key!r} (has: {', '.join(map(str, data))})"
            )
        if not isinstance(data[key], list):
            raise CocoFormatError(
                f"{source_name}: {key!r} must be a list, got {type(data[key]).__name__}"
            )
    return data


def read_instances_from_zip(
    annotations_zip: str | os.PathLike, member: str, annotation_hook: AnnotationHook | None = None
) -> dict:
    """`load_instances` of one member of the COCO annotations zip."""
    source = f"{annotations_zip}:{member}"
    try:
        with zipfile.ZipFile(annotations_zip) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                jsons = [n for n in zf.namelist() if n.endswith(".json")]
                raise CocoFormatError(
                    f"{annotations_zip}: no member {member!r} (JSON members: {', '.join(jsons) or 'none'})"
                ) from None
            with zf.open(info) as f:
                # the file object, not its bytes: the bytes must be gone before parsing starts
                return load_instances(f, source, annotation_hook)
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise CocoFormatError(f"{annotations_zip}: not a readable zip file ({e})") from None


def image_files_in_zip(images_zip: str | os.PathLike, split: str) -> set[str]:
    """File names present under `<split>/` in the images zip (namelist only, nothing decoded)."""
    try:
        with zipfile.ZipFile(images_zip) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise CocoFormatError(f"{images_zip}: not a readable zip file ({e})") from None
    prefix = f"{split}/"
    return {n[len(prefix) :] for n in names if n.startswith(prefix) and not n.endswith("/")}


def _index_images(images: list, source: str) -> list[tuple[int, str, int, int]]:
    """`images` entries as (id, file_name, height, width); a broken entry is a format error."""
    out, seen_ids, seen_stems = [], set(), set()
    for i, img in enumerate(images):
        where = f"{source}: images[{i}]"
        if not isinstance(img, dict):
            raise CocoFormatError(f"{where}: expected an object, got {type(img).__name__}")
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise CocoFormatError(f"{where}: missing required key {key!r}")
        iid, name, h, w = img["id"], img["file_name"], img["height"], img["width"]
        if not _is_int(iid):
            raise CocoFormatError(f"{where}: 'id' must be an integer, got {iid!r}")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise CocoFormatError(f"{where}: 'file_name' must be a bare file name, got {name!r}")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise CocoFormatError(
                f"{where}: 'height'/'width' must be positive integers, got {h!r}/{w!r}"
            )
        stem = Path(name).stem
        if iid in seen_ids:
            raise CocoFormatError(f"{where}: duplicate image id {iid}")
        if stem in seen_stems:
            raise CocoFormatError(f"{where}: duplicate file name stem {stem!r} (record keys)")
        seen_ids.add(iid)
        seen_stems.add(stem)
        out.append((iid, name, h, w))
    return out


def _category_ids(categories: list, source: str) -> set[int]:
    """The ids of `categories`; CocoFormatError if an entry has no integer id, or if a COCO id
    mapped to a VOC class carries another name than COCO's (`check_category_names`)."""
    ids, names = set(), {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise CocoFormatError(f"{source}: categories[{i}] has no integer 'id' ({cat!r:.80})")
        ids.add(cat["id"])
        names[cat["id"]] = cat.get("name")
    check_category_names(names, source)
    return ids


def check_category_names(names: Mapping[int, Any], source: str) -> None:
    """Refuse a file whose categories are numbered differently from COCO 2017.

    `names` maps the file's category ids to their `name`. Every id that `COCO_TO_VOC` maps and
    the file defines must carry COCO's name (`COCO_NAMES`, compared case-insensitively, spaces
    trimmed); otherwise an exporter renumbered the categories and the ids would be converted to
    the wrong VOC classes. Raises CocoFormatError naming the file, the id, the expected and the
    found name. Mapped ids the file does not define are not an error (their annotations are
    skipped as `unknown_category_id`).
    """
    for cid, found in names.items():  # in the file's order: the first mismatch is reported
        expected = COCO_NAMES.get(cid)
        if expected is None:
            continue
        if not isinstance(found, str) or found.strip().casefold() != expected:
            raise CocoFormatError(
                f"{source}: category id {cid} is named {found!r}, expected {expected!r} (COCO "
                f"2017 numbering, mapped to VOC class {VOC_CLASSES[COCO_TO_VOC[cid]]!r}): the "
                "file's categories are numbered differently; refusing to guess the classes"
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- validation: every annotation is checked, a malformed one is skipped and counted ----------
#
# Two phases, because in COCO files "categories" follows "annotations": `_compact_annotation`
# runs while parsing (checks that need no image or category), `_finish_annotation` once
# `images` and `categories` are known (ids, image size, the order of SKIP_REASONS).


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
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return SKIP_BAD_SEGMENTATION, None, ()
        if isinstance(counts, list):  # uncompressed RLE (COCO's crowd annotations)
            if not counts or not all(_is_int(c) and c >= 0 for c in counts):
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


def _prepare_segmentation(segm: Any, h: int, w: int) -> tuple[str | None, Any]:
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


def _compact_annotation(ann: Any, index: int) -> tuple:
    """Phase 1, run as each annotation is parsed: (id, image_id, category_id, iscrowd,
    reason or None, parsed segmentation, dropped part reasons, region box or None). Only VOC
    classes keep their polygons and region. A missing `iscrowd` is 0 (as in pycocotools)."""
    if not isinstance(ann, dict):
        return (f"annotations[{index}]", None, None, 0, SKIP_MALFORMED, None, (), None)
    ident = ann.get("id")
    ident = ident if _is_int(ident) or isinstance(ident, str) else f"annotations[{index}]"
    image_id, cat, crowd = ann.get("image_id"), ann.get("category_id"), ann.get("iscrowd", 0)
    if not (_is_int(image_id) and _is_int(cat) and crowd in (0, 1)):
        return (ident, None, None, 0, SKIP_MALFORMED, None, (), None)
    reason, parsed, dropped = _parse_segmentation(ann.get("segmentation"))
    box = None
    if not voc_class(cat):
        if parsed is not None:
            parsed = (None, parsed[1])  # never rasterized: keep the size check only
    else:  # phase 2 may still find the segmentation unusable (off the image, RLE size)
        box = _region_box(ann)
    return (ident, image_id, cat, int(crowd), reason, parsed, dropped, box)


def _finish_annotation(
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
    skip, _seg, ignore, _dropped = _finish_annotation(
        _compact_annotation(ann, 0), image_sizes, cats, missing
    )
    return skip or ignore


# --- rasterization and the VOC rules -----------------------------------------------------------


def _union_rle(segms: Sequence[Any], h: int, w: int) -> dict:
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
    reason, prepared = _prepare_segmentation(ann.get("segmentation"), h, w)
    if reason is not None:
        raise ValueError(f"annotation {ann.get('id')!r}: cannot rasterize ({reason})")
    return mask_utils.decode(_union_rle([prepared], h, w)).astype(bool)


def voc_class(category_id: int) -> int:
    """VOC class index 1..20 of a COCO category, 0 (background) for the other 60."""
    return COCO_TO_VOC.get(category_id, 0)


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


def _group(anns_prepared: Iterable[tuple[int, int, Any]]) -> dict[int, list]:
    """(category_id, iscrowd, prepared segmentation) -> {voc class or CROWD: [segmentations]}."""
    groups: dict[int, list] = {}
    for cat, crowd, seg in anns_prepared:
        cls = voc_class(cat)
        if cls:
            groups.setdefault(CROWD if crowd else cls, []).append(seg)
    return groups


def _label_map_from_rles(rles: Mapping[int, dict], h: int, w: int) -> np.ndarray:
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
        rec = _compact_annotation({**ann, "image_id": 0}, i)
        skip, seg, ignore, _dropped = _finish_annotation(rec, {0: (h, w)}, {rec[2]}, frozenset())
        if skip is not None:
            raise ValueError(f"annotation {ann.get('id')!r}: cannot rasterize ({skip})")
        if ignore is not None:
            if seg is None:
                raise ValueError(f"annotation {ann.get('id')!r}: {ignore} and no region (bbox)")
            if seg:
                prepared.append((rec[2], 1, seg))
            continue
        prepared.append((rec[2], rec[3], seg))
    groups = _group(prepared)
    rles = {k: _union_rle(v, h, w) for k, v in groups.items()}
    return np.ascontiguousarray(_label_map_from_rles(rles, h, w))


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


# --- per-image work (runs in the workers) ------------------------------------------------------


def _convert_task(task: tuple, min_pixels: int) -> tuple[bytes | None, int]:
    """Worker: (key, h, w, groups) -> (PNG bytes, or None if dropped; VOC pixel count)."""
    key, h, w, groups = task
    try:
        rles = {k: _union_rle(segms, h, w) for k, segms in groups.items()}
        if min_pixels > 0:
            # the class areas bound the VOC pixels from above: drop without decoding or PNG
            bound = sum(int(mask_utils.area(r)) for k, r in rles.items() if k != CROWD)
            if not keep_image(bound, min_pixels):
                return None, bound
        label = _label_map_from_rles(rles, h, w)
        voc_pixels = voc_pixel_count(label)
        if not keep_image(voc_pixels, min_pixels):
            return None, voc_pixels
        return encode_label_png(label), voc_pixels
    except Exception as e:  # name the image: a bare pycocotools error says nothing
        raise RuntimeError(f"image {key!r} ({h}x{w}): {type(e).__name__}: {e}") from e


# --- the split --------------------------------------------------------------------------------


class _Reasons:
    """Counts and (capped) id lists per reason."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.counts = dict.fromkeys(reasons, 0)
        self.ids: dict[str, list] = {r: [] for r in reasons}

    def add(self, reason: str, ident: Any) -> None:
        self.counts[reason] += 1
        if len(self.ids[reason]) < ID_LIST_CAP:
            self.ids[reason].append(ident)

    def report(self) -> dict[str, dict]:
        return {
            r: {"count": n, "ids": self.ids[r], "ids_truncated": n > len(self.ids[r])}
            for r, n in self.counts.items()
        }


def plan_split(data: dict, source: str, present_files: set[str] | None = None) -> dict:
    """Validate and group one instances file into per-image tasks (empties `data["annotations"]`).

    `data["annotations"]` may hold annotation dicts or `_compact_annotation` records (what
    `load_instances(..., annotation_hook=_compact_annotation)` gives). Returns {"images":
    [(id, file_name, h, w)], "tasks": [(key, h, w, groups), or None for a missing file],
    "skipped": _Reasons, "repaired": _Reasons, "ignored": _Reasons, "stats": {...}}; a task is
    a drop reason (str) instead for an image that cannot be converted. `present_files=None`
    skips the zip check.
    """
    images = _index_images(data["images"], source)
    category_ids = _category_ids(data["categories"], source)
    slot = {iid: i for i, (iid, *_rest) in enumerate(images)}
    sizes = {iid: (h, w) for iid, _name, h, w in images}
    missing = (
        set()
        if present_files is None
        else {iid for iid, name, _h, _w in images if name not in present_files}
    )
    prepared: list[list | None] = [None] * len(images)
    skipped = _Reasons(SKIP_REASONS)
    repaired = _Reasons(SEGMENTATION_REASONS)  # VOC objects with polygon parts dropped
    ignored = _Reasons(SEGMENTATION_REASONS)  # VOC objects marked ignore (region)
    no_region: set[int] = set()
    anns = data["annotations"]
    n_anns, n_voc, n_other, n_ignored = len(anns), 0, 0, 0
    for i in range(n_anns):
        rec = anns[i]
        anns[i] = None  # free each record as soon as it is converted
        if not isinstance(rec, tuple):
            rec = _compact_annotation(rec, i)
        reason, seg, ignore, dropped = _finish_annotation(rec, sizes, category_ids, missing)
        if reason is not None:
            skipped.add(reason, rec[0])
            continue
        ident, image_id, cat, crowd = rec[:4]
        if not voc_class(cat):
            n_other += 1
            continue
        if ignore is not None:  # nothing usable: its region is ignore, never background
            n_ignored += 1
            ignored.add(ignore, ident)
            if seg is None:
                no_region.add(image_id)
                continue
            if not seg:  # the region lies outside the image
                continue
            crowd = 1
        else:
            n_voc += 1
            for r in dict.fromkeys(dropped):
                repaired.add(r, ident)
        j = slot[image_id]
        if prepared[j] is None:
            prepared[j] = []
        prepared[j].append((cat, crowd, seg))
    data["annotations"] = []
    tasks = []
    for j, (iid, name, h, w) in enumerate(images):
        if iid in missing:
            tasks.append(DROP_MISSING_FILE)
        elif iid in no_region:
            tasks.append(DROP_NO_REGION)
        else:
            tasks.append((Path(name).stem, h, w, _group(prepared[j] or ())))
        prepared[j] = None
    stats = {
        "annotations_total": n_anns,
        "annotations_used_voc": n_voc,
        "annotations_non_voc": n_other,
        "annotations_voc_marked_ignore": n_ignored,
        "annotations_skipped": n_anns - n_voc - n_other - n_ignored,
    }
    return {
        "images": images,
        "tasks": tasks,
        "skipped": skipped,
        "repaired": repaired,
        "ignored": ignored,
        "stats": stats,
    }


def rejected_share(plan: Mapping[str, Any]) -> tuple[float, float]:
    """(share of annotations rejected, share of images dropped for a fault) of a plan.

    Rejected: skipped (`SKIP_REASONS`) or, for a VOC-class object, marked ignore because
    nothing of its segmentation was usable. Fault drops: `FAULT_DROPS` (not `min_pixels`,
    which drops images without VOC objects by design). 0.0 for an empty split.
    """
    st = plan["stats"]
    rejected = st["annotations_skipped"] + st["annotations_voc_marked_ignore"]
    ann_share = rejected / st["annotations_total"] if st["annotations_total"] else 0.0
    faults = sum(1 for t in plan["tasks"] if isinstance(t, str))
    img_share = faults / len(plan["images"]) if plan["images"] else 0.0
    return ann_share, img_share


def check_rejected(plan: Mapping[str, Any], source: str, max_rejected_fraction: float) -> None:
    """CocoRejectedError naming the file, the shares and every reason count when more than
    `max_rejected_fraction` of the annotations are rejected or of the images dropped for a fault
    (`rejected_share`); the same kind of limit as preprocess's `max_bad_fraction`."""
    ann_share, img_share = rejected_share(plan)
    if ann_share <= max_rejected_fraction and img_share <= max_rejected_fraction:
        return
    st = plan["stats"]
    reasons = {
        **{r: n for r, n in plan["skipped"].counts.items() if n},
        **{f"voc_marked_ignore:{r}": n for r, n in plan["ignored"].counts.items() if n},
    }
    drops: dict[str, int] = {}
    for t in plan["tasks"]:
        if isinstance(t, str):
            drops[t] = drops.get(t, 0) + 1
    raise CocoRejectedError(
        f"{source}: {st['annotations_skipped'] + st['annotations_voc_marked_ignore']} of "
        f"{st['annotations_total']} annotations rejected ({ann_share:.2%}) and "
        f"{sum(drops.values())} of {len(plan['images'])} images dropped for a fault "
        f"({img_share:.2%}); more than coco_to_voc.max_rejected_fraction "
        f"{max_rejected_fraction:g}. Annotations by reason: {reasons or 'none'}; images by "
        f"reason: {drops or 'none'}. Nothing was written."
    )


def _drain(items: list) -> Iterator:
    """Yield the items of a list, dropping the list's reference to each one as it goes."""
    for i in range(len(items)):
        item, items[i] = items[i], None
        yield item


def _run_tasks(
    tasks: list[tuple], min_pixels: int, workers: int, progress: bool, desc: str
) -> Iterator[tuple[bytes | None, int]]:
    """Yield (PNG or None, VOC pixel count) per task, in task order; empties `tasks`.

    workers=1 runs in this process. Otherwise a spawned pool: its workers start from a fresh
    interpreter, so they never hold (or copy-on-write-count) the parent's parsed JSON; the
    ordered imap keeps the output deterministic, and its pipes bound the work in flight.
    """
    fn = functools.partial(_convert_task, min_pixels=min_pixels)
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, mininterval=1.0)
    try:
        if workers <= 1 or len(tasks) < 2:
            for t in _drain(tasks):
                result = fn(t)
                bar.update()  # before the yield: the consumer never resumes after the last one
                yield result
            return
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        with mp.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(fn, _drain(tasks), chunksize=chunksize):
                bar.update()
                yield result
    finally:
        bar.close()


def convert_split(
    annotations_zip: Path,
    images_zip: Path,
    split: str,
    out_dir: Path,
    *,
    min_pixels: int,
    workers: int,
    shard_size: int,
    progress: bool = True,
    max_rejected_fraction: float = 1.0,
) -> dict:
    """Convert `annotations/instances_<split>.json` into the shard dir `out_dir`; return the report.

    `images_zip` is only listed (its `<split>/<file_name>` members), never decoded. Raises
    CocoFormatError for an unusable file and CocoRejectedError (before anything is written)
    when more than `max_rejected_fraction` is rejected (`check_rejected`).
    """
    t0 = time.perf_counter()
    member = f"annotations/instances_{split}.json"
    source = f"{annotations_zip}:{member}"
    present = image_files_in_zip(images_zip, split)
    data = read_instances_from_zip(annotations_zip, member, _compact_annotation)
    t_load = time.perf_counter()
    plan = plan_split(data, source, present)
    del data
    check_rejected(plan, source, max_rejected_fraction)
    shares = rejected_share(plan)
    t_plan = time.perf_counter()

    images, tasks = plan["images"], plan.pop("tasks")
    # per image slot: a drop reason decided here, or None = sent to the workers
    verdict: list[str | None] = []
    work = []
    for task in tasks:
        if isinstance(task, str):
            verdict.append(task)
        elif min_pixels > 0 and all(k == CROWD for k in task[3]):
            verdict.append(DROP_FEW_PIXELS)  # no VOC-class instance: nothing to rasterize
        else:
            verdict.append(None)
            work.append(task)
    del tasks

    dropped = _Reasons(DROP_REASONS)
    writer = ShardWriter(out_dir, shard_size)
    voc_pixels_total = 0
    try:
        results = _run_tasks(work, min_pixels, workers, progress, f"coco_to_voc {split}")
        with contextlib.closing(results):  # an error here must still stop the pool
            for (iid, name, h, w), reason in zip(images, verdict, strict=True):
                png = None
                if reason is None:
                    png, voc_pixels = next(results)
                    reason = DROP_FEW_PIXELS if png is None else None
                if reason is not None:
                    dropped.add(reason, iid)
                    continue
                voc_pixels_total += voc_pixels
                meta = {"image_id": iid, "file_name": name, "width": w, "height": h, "split": split}
                writer.add(Path(name).stem, {"label": png}, meta)
        kept = len(writer)
        writer.close(
            extra={
                "source": "coco2017",
                "split": split,
                "classes": list(VOC_CLASSES),
                "ignore_index": IGNORE_INDEX,
            }
        )
    except BaseException as e:
        writer.abort(e)
        raise
    t_end = time.perf_counter()
    convert_s = t_end - t_plan
    return {
        "split": split,
        "annotations": source,
        "images_zip": str(images_zip),
        "min_pixels": min_pixels,
        "workers": workers,
        "images_total": len(images),
        "images_kept": kept,
        "images_dropped": dropped.report(),
        "voc_pixels_kept": voc_pixels_total,
        **plan["stats"],
        "annotations_skipped_by_reason": plan["skipped"].report(),
        "voc_objects_parts_dropped_by_reason": plan["repaired"].report(),
        "voc_objects_marked_ignore_by_reason": plan["ignored"].report(),
        "rejected_share": {"annotations": shares[0], "images": shares[1]},
        "max_rejected_fraction": max_rejected_fraction,
        "id_list_cap": ID_LIST_CAP,
        "timings_s": {
            "load_json": round(t_load - t0, 3),
            "validate_group": round(t_plan - t_load, 3),
            "convert_write": round(convert_s, 3),
            "total": round(t_end - t0, 3),
        },
        "images_per_s": round(len(images) / convert_s, 1) if convert_s > 0 else None,
    }


def label_png_to_array(png: bytes) -> np.ndarray:
    """Decode a stored label PNG back to (h, w) uint8 (for readers and tests)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        if im.mode != "L":
            raise ValueError(f"label PNG has mode {im.mode!r}, expected 'L'")
        return np.asarray(im, dtype=np.uint8).copy()
