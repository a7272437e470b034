"""COCO 2017 instances JSON: parsed streaming, top-level keys, `images` and `categories` checked.

`load_instances` parses the file once; with an annotation hook the top-level "annotations"
array is decoded element by element (`_parse_streaming`), so each annotation can be reduced to
a compact record as it is read and the ~860k dicts of train2017 never coexist. A file that is
not JSON, or lacks `images`/`annotations`/`categories`, raises `CocoFormatError` naming the
file (or `zip:member`) and the key. Category ids are trusted only after the names of the 20
mapped ids in the file's `categories` are checked against COCO's (`pipeline.classes`).
"""

from __future__ import annotations

import gc
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.classes import COCO_NAMES, COCO_TO_VOC, VOC_CLASSES

REQUIRED_KEYS = ("images", "annotations", "categories")


class CocoFormatError(ValueError):
    """The annotation file itself is unusable; the message names the file/member and the key."""


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


def index_images(images: list, source: str) -> list[tuple[int, str, int, int]]:
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
        if not is_int(iid):
            raise CocoFormatError(f"{where}: 'id' must be an integer, got {iid!r}")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise CocoFormatError(f"{where}: 'file_name' must be a bare file name, got {name!r}")
        if not (is_int(h) and is_int(w) and h > 0 and w > 0):
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


def checked_category_ids(categories: list, source: str) -> set[int]:
    """The ids of `categories`; CocoFormatError if an entry has no integer id, or if a COCO id
    mapped to a VOC class carries another name than COCO's (`check_category_names`)."""
    ids, names = set(), {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not is_int(cat.get("id")):
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


def is_int(v: Any) -> bool:
    """True for a JSON integer (a Python int that is not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)
