"""The one source of truth for VOC class names, the VOC palette and the COCO-to-VOC id map."""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)  # 21, background included
IGNORE_INDEX = 255  # VOC marks object boundaries and "difficult" pixels with 255

# COCO 2017 category (id, name as COCO spells it) of each VOC foreground class, in VOC order
# (index 1..20). Four names differ from VOC's: airplane, motorcycle, couch, tv (and the spaces
# of "dining table", "potted plant"). The converter checks these names against a file's
# `categories` before trusting its ids.
COCO_VOC_CATEGORIES: tuple[tuple[int, str, int], ...] = (
    (5, "airplane", 1),  # -> aeroplane
    (2, "bicycle", 2),
    (16, "bird", 3),
    (9, "boat", 4),
    (44, "bottle", 5),
    (6, "bus", 6),
    (3, "car", 7),
    (17, "cat", 8),
    (62, "chair", 9),
    (21, "cow", 10),
    (67, "dining table", 11),  # -> diningtable
    (18, "dog", 12),
    (19, "horse", 13),
    (4, "motorcycle", 14),  # -> motorbike
    (1, "person", 15),
    (64, "potted plant", 16),  # -> pottedplant
    (20, "sheep", 17),
    (63, "couch", 18),  # -> sofa
    (7, "train", 19),
    (72, "tv", 20),  # -> tvmonitor
)
COCO_TO_VOC: dict[int, int] = {cid: voc for cid, _name, voc in COCO_VOC_CATEGORIES}
COCO_NAMES: dict[int, str] = {cid: name for cid, name, _voc in COCO_VOC_CATEGORIES}
VOC_TO_COCO: dict[int, int] = {v: k for k, v in COCO_TO_VOC.items()}


def voc_palette(n: int = 256) -> np.ndarray:
    """VOC `labelcolormap`: (n, 3) uint8 colours; bit-interleaved class ids, 255 -> (224,224,192)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def voc_palette_flat() -> list[int]:
    """The palette as PIL's `putpalette` wants it: 768 ints."""
    return voc_palette(256).reshape(-1).tolist()
