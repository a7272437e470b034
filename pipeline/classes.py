"""The one source of truth for VOC class names, the VOC palette and the COCO-to-VOC id map."""

from __future__ import annotations

from typing import Any

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

# The real COCO 2017 `categories` (id, name, supercategory): 80 classes, ids 1..90 with gaps.
COCO_CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"supercategory": sup, "id": cid, "name": name}
    for cid, name, sup in (
        (1, "person", "person"),
        (2, "bicycle", "vehicle"),
        (3, "car", "vehicle"),
        (4, "motorcycle", "vehicle"),
        (5, "airplane", "vehicle"),
        (6, "bus", "vehicle"),
        (7, "train", "vehicle"),
        (8, "truck", "vehicle"),
        (9, "boat", "vehicle"),
        (10, "traffic light", "outdoor"),
        (11, "fire hydrant", "outdoor"),
        (13, "stop sign", "outdoor"),
        (14, "parking meter", "outdoor"),
        (15, "bench", "outdoor"),
        (16, "bird", "animal"),
        (17, "cat", "animal"),
        (18, "dog", "animal"),
        (19, "horse", "animal"),
        (20, "sheep", "animal"),
        (21, "cow", "animal"),
        (22, "elephant", "animal"),
        (23, "bear", "animal"),
        (24, "zebra", "animal"),
        (25, "giraffe", "animal"),
        (27, "backpack", "accessory"),
        (28, "umbrella", "accessory"),
        (31, "handbag", "accessory"),
        (32, "tie", "accessory"),
        (33, "suitcase", "accessory"),
        (34, "frisbee", "sports"),
        (35, "skis", "sports"),
        (36, "snowboard", "sports"),
        (37, "sports ball", "sports"),
        (38, "kite", "sports"),
        (39, "baseball bat", "sports"),
        (40, "baseball glove", "sports"),
        (41, "skateboard", "sports"),
        (42, "surfboard", "sports"),
        (43, "tennis racket", "sports"),
        (44, "bottle", "kitchen"),
        (46, "wine glass", "kitchen"),
        (47, "cup", "kitchen"),
        (48, "fork", "kitchen"),
        (49, "knife", "kitchen"),
        (50, "spoon", "kitchen"),
        (51, "bowl", "kitchen"),
        (52, "banana", "food"),
        (53, "apple", "food"),
        (54, "sandwich", "food"),
        (55, "orange", "food"),
        (56, "broccoli", "food"),
        (57, "carrot", "food"),
        (58, "hot dog", "food"),
        (59, "pizza", "food"),
        (60, "donut", "food"),
        (61, "cake", "food"),
        (62, "chair", "furniture"),
        (63, "couch", "furniture"),
        (64, "potted plant", "furniture"),
        (65, "bed", "furniture"),
        (67, "dining table", "furniture"),
        (70, "toilet", "furniture"),
        (72, "tv", "electronic"),
        (73, "laptop", "electronic"),
        (74, "mouse", "electronic"),
        (75, "remote", "electronic"),
        (76, "keyboard", "electronic"),
        (77, "cell phone", "electronic"),
        (78, "microwave", "appliance"),
        (79, "oven", "appliance"),
        (80, "toaster", "appliance"),
        (81, "sink", "appliance"),
        (82, "refrigerator", "appliance"),
        (84, "book", "indoor"),
        (85, "clock", "indoor"),
        (86, "vase", "indoor"),
        (87, "scissors", "indoor"),
        (88, "teddy bear", "indoor"),
        (89, "hair drier", "indoor"),
        (90, "toothbrush", "indoor"),
    )
)
# COCO 2017 category id -> VOC foreground class (1..20), in VOC order. Four COCO names differ
# from VOC's: airplane, motorcycle, couch, tv (and the spaces of "dining table", "potted
# plant"). The converter checks COCO's names of these ids (`COCO_NAMES`) against a file's
# `categories` before trusting its ids.
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
COCO_NAMES: dict[int, str] = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["id"] in COCO_TO_VOC}
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
