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

# COCO 2017 category id of each VOC foreground class, in VOC order (index 1..20).
# Names differ for four of them: airplane, motorcycle, couch, tv.
COCO_TO_VOC: dict[int, int] = {
    5: 1,  # airplane -> aeroplane
    2: 2,  # bicycle
    16: 3,  # bird
    9: 4,  # boat
    44: 5,  # bottle
    6: 6,  # bus
    3: 7,  # car
    17: 8,  # cat
    62: 9,  # chair
    21: 10,  # cow
    67: 11,  # dining table -> diningtable
    18: 12,  # dog
    19: 13,  # horse
    4: 14,  # motorcycle -> motorbike
    1: 15,  # person
    64: 16,  # potted plant -> pottedplant
    20: 17,  # sheep
    63: 18,  # couch -> sofa
    7: 19,  # train
    72: 20,  # tv -> tvmonitor
}
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
