"""What the data stages dropped and why, read from their reports (for the data card).

`coco_dropped` lists every reason of coco_to_voc's report.json with its count per split;
`preprocess_dropped` groups preprocess's skipped inputs by the kind of their message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

COCO_IMAGE_DROPS = "images dropped"


COCO_SKIPPED = "annotations skipped"


COCO_IGNORED = "VOC objects marked ignore (255)"


COCO_PARTS = "VOC objects kept, polygon parts dropped"


_COCO_SECTIONS = (
    (COCO_IMAGE_DROPS, "images_dropped"),
    (COCO_SKIPPED, "annotations_skipped_by_reason"),
    (COCO_IGNORED, "voc_objects_marked_ignore_by_reason"),
    (COCO_PARTS, "voc_objects_parts_dropped_by_reason"),
)


def coco_dropped(report: Mapping[str, Any]) -> list[tuple[str, str, dict[str, int]]]:
    """(what, reason, {split: count}) for every reason of the coco_to_voc report, in the
    report's order: images dropped, annotations skipped, VOC objects marked ignore, VOC objects
    with polygon parts dropped."""
    splits = report.get("splits", {})
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for what, key in _COCO_SECTIONS:
        for split, r in splits.items():
            for reason, entry in r.get(key, {}).items():
                rows.setdefault((what, reason), {})[split] = int(entry["count"])
    return [(what, reason, by_split) for (what, reason), by_split in rows.items()]


# BadSample messages of pipeline/data/preprocess_image.py, by kind (the first matching pattern wins)
_PREPROCESS_REASONS = (
    (re.compile(r"^label values outside"), "label values outside 0..20/255"),
    (re.compile(r"^label is \d+x\d+ but its image"), "image and label sizes differ"),
    (
        re.compile(r"^(not a PNG file|label PNG must be|corrupt PNG|label decoded to)"),
        "label map does not decode",
    ),
    (
        re.compile(r"^(not a JPEG or PNG image|corrupt image|decoded to|\S+ image \(PIL mode)"),
        "image does not decode",
    ),
)


def preprocess_reason(reason: str) -> str:
    """The kind of a preprocess skip reason (its message without the file's details)."""
    for pattern, kind in _PREPROCESS_REASONS:
        if pattern.search(reason):
            return kind
    return "unreadable archive member or other"


def preprocess_dropped(report: Mapping[str, Any]) -> list[tuple[str, str, str, int]]:
    """(split, source, reason kind, count) of the inputs preprocess skipped, sorted."""
    counts: dict[tuple[str, str, str], int] = {}
    for s in report.get("skipped", []):
        source = s["key"].split("/", 1)[0] if "/" in s["key"] else "unknown"
        key = (s["split"], source, preprocess_reason(s["reason"]))
        counts[key] = counts.get(key, 0) + 1
    return [(*k, n) for k, n in sorted(counts.items())]
