"""Offline sample data: synthetic VOC 2012 / COCO 2017 archives with the real internal layout.

The `sample` profile must run every later stage on exactly the code paths of the `full` profile,
so the generators below write the same containers the downloads deliver:

    VOCtrainval_11-May-2012.tar   VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/...}
    train2017.zip, val2017.zip    train2017/<012d>.jpg, val2017/<012d>.jpg
    annotations_trainval2017.zip  annotations/instances_{train,val}2017.json

Each VOC class has one fixed appearance (a saturated base colour, a shape family and a stripe
pattern) on muted, low-saturation backgrounds, so a tiny FCN learns the task in a minute of CPU.
Label maps and COCO masks come from the very masks the image was painted with. Everything is
drawn from `numpy.random.Generator`s seeded by `(seed, stream, index)`, and archive members have
fixed times, owners and order, so the same arguments give byte-identical archives.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.atomic import atomic_path
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES, VOC_TO_COCO, voc_palette_flat

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
# COCO classes that are background for VOC: traffic light, bench, umbrella, cup, laptop, clock.
NON_VOC_COCO_IDS: tuple[int, ...] = (10, 15, 28, 47, 73, 85)

VOC_ROOT = "VOCdevkit/VOC2012"
VOC_MTIME = 1336694400  # 2012-05-11, the VOC2012 trainval release
COCO_ZIP_TIME = (2017, 9, 1, 0, 0, 0)
JPEG_QUALITY = 90
BOUNDARY_RADIUS = 2  # VOC's void band: 2 px either side of an outline, 4-5 px wide in all
# separate random streams: VOC images, COCO images and the backbone's classification crops differ
STREAM_VOC, STREAM_COCO, STREAM_CROPS = 0, 1, 2


# --- per-class appearance: one fixed colour, shape family and stripe pattern per VOC class -------


def class_colour(c: int) -> np.ndarray:
    """RGB in 0..1 of VOC class `c` (1..20): 10 hues 36 deg apart, bright for 1-10, dark for 11-20.

    The dark group is shifted by 18 deg, so any two classes differ in hue by >= 18 deg and those of
    the same brightness by >= 36 deg; saturation 0.9 keeps them far from the muted backgrounds.
    Value 0.95 against 0.45: the darker stripes of a bright class (x 0.8, `paint_class`) stay
    far brighter than a dark class, so brightness tells the two groups apart everywhere.
    """
    k, dark = (c - 1) % 10, (c - 1) // 10
    hue = (k * 36 + dark * 18) / 360.0
    return np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.45 if dark else 0.95), dtype=np.float32)


def class_shape(c: int) -> int:
    """Shape family (index into `_UNIT_SHAPES`) of VOC class `c`."""
    return (c - 1) % len(_UNIT_SHAPES)


def class_stripes(c: int) -> tuple[float, float]:
    """(angle in radians, period in px) of the stripe texture of VOC class `c`."""
    return np.deg2rad(45.0 * ((c - 1) % 4)), (6.0, 9.0, 13.0)[((c - 1) // 4) % 3]


def _regular(n: int, r_in: float | None = None) -> np.ndarray:
    """A regular n-gon (or a 2n-pointed star when `r_in` is given) of radius 1."""
    if r_in is None:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) - np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


_UNIT_SHAPES: tuple[np.ndarray, ...] = (
    _regular(24),  # ellipse
    np.array([[-1, -0.7], [1, -0.7], [1, 0.7], [-1, 0.7]], float),  # rectangle
    _regular(3),  # triangle
    np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float),  # diamond
    _regular(5, 0.45),  # star
    np.array(  # cross
        [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1]]
        + [[-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]],
        float,
    ),
    _regular(6),  # hexagon
    np.array(  # arrow
        [[-1, -0.3], [0.2, -0.3], [0.2, -0.8], [1, 0], [0.2, 0.8], [0.2, 0.3], [-1, 0.3]], float
    ),
)


# --- geometry ---------------------------------------------------------------------------------


def shape_polygon(
    family: int, cx: float, cy: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """(k, 2) polygon of a shape family: random aspect, rotation and a little vertex jitter."""
    pts = _UNIT_SHAPES[family] * rng.uniform(0.92, 1.08, (len(_UNIT_SHAPES[family]), 1))
    aspect = rng.uniform(0.75, 1.33)
    pts = pts * np.array([aspect, 1 / aspect])
    t = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rot.T * r + np.array([cx, cy])


def polygons_to_coco(polys: list[np.ndarray], h: int, w: int) -> list[list[float]]:
    """COCO polygon segmentation: flat [x1, y1, x2, y2, ...] lists, clipped to the image."""
    out = []
    for p in polys:
        q = np.clip(p, 0, [w, h])
        out.append([round(float(v), 2) for v in q.reshape(-1)])
    return out


def coco_polygons_mask(segmentation: list[list[float]], h: int, w: int) -> np.ndarray:
    """Rasterise exactly as pycocotools' `annToMask` does, so annotation and image agree."""
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    return mask_utils.decode(rle).astype(bool)


def rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO crowd RLE: column-major run lengths starting with a run of zeros (`counts` a list)."""
    h, w = mask.shape
    flat = mask.reshape(-1, order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [h, w]}


def boundary_band(instances: np.ndarray, radius: int = BOUNDARY_RADIUS) -> np.ndarray:
    """Pixels within `radius` of a change of instance id: VOC's void band along every outline."""
    p = np.pad(instances, radius, mode="edge")
    h, w = instances.shape
    lo = hi = instances
    for dy in range(2 * radius + 1):  # square window: max/min over all shifts
        for dx in range(2 * radius + 1):
            s = p[dy : dy + h, dx : dx + w]
            lo, hi = np.minimum(lo, s), np.maximum(hi, s)
    return lo != hi


# --- scenes -----------------------------------------------------------------------------------


@dataclass
class _Object:
    voc_class: int  # 1..20, or 0 for clutter / a non-VOC COCO category
    coco_id: int  # COCO category id (0: VOC clutter without annotation)
    segmentation: list[list[float]] | None  # COCO polygons; None for a crowd (RLE)
    mask: np.ndarray  # full (amodal) mask; what is visible depends on the drawing order
    crowd: bool = False
    visible: np.ndarray | None = field(default=None, repr=False)


def _place_object(
    rng: np.random.Generator,
    h: int,
    w: int,
    family: int,
    placed: list[_Object],
    *,
    r_range: tuple[float, float],
    two_part_p: float,
    max_overlap: float = 0.3,
    centre_range: tuple[float, float] = (0.1, 0.9),
) -> tuple[list[list[float]], np.ndarray]:
    """Polygons and mask of one object overlapping earlier ones by at most `max_overlap`.

    The fraction counts both ways (of this object and of each earlier one); after 20 tries the
    least overlapping placement wins.
    """
    side = min(h, w)
    best = None
    for _ in range(20):
        r = rng.uniform(*r_range) * side
        cx, cy = rng.uniform(*centre_range) * w, rng.uniform(*centre_range) * h
        polys = [shape_polygon(family, cx, cy, r, rng)]
        if rng.random() < two_part_p:  # a second, smaller part: COCO's multi-polygon objects
            r2 = r * rng.uniform(0.4, 0.6)
            a = rng.uniform(0, 2 * np.pi)
            d = (r + r2) * 1.15
            polys.append(shape_polygon(family, cx + d * np.cos(a), cy + d * np.sin(a), r2, rng))
        seg = polygons_to_coco(polys, h, w)
        if any(len(s) < 6 for s in seg):
            continue
        m = coco_polygons_mask(seg, h, w)
        area = int(m.sum())
        if area < 64:
            continue
        overlap = max(
            (int((m & o.mask).sum()) / max(1, int(o.mask.sum())) for o in placed), default=0
        )
        overlap = max(overlap, max((int((m & o.mask).sum()) / area for o in placed), default=0))
        if best is None or overlap < best[0]:
            best = (overlap, seg, m)
        if overlap <= max_overlap:
            break
    if best is None:  # degenerate image size: fall back to a centred rectangle
        seg = [[w * 0.25, h * 0.25, w * 0.75, h * 0.25, w * 0.75, h * 0.75, w * 0.25, h * 0.75]]
        return seg, coco_polygons_mask(seg, h, w)
    return best[1], best[2]


def _crowd_object(rng: np.random.Generator, h: int, w: int, c: int) -> _Object:
    """A COCO crowd: a cluster of small same-class shapes annotated as one RLE region."""
    side = min(h, w)
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(3, 7))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.18) * side
        poly = shape_polygon(
            class_shape(c),
            cx + d * np.cos(a),
            cy + d * np.sin(a),
            rng.uniform(0.05, 0.09) * side,
            rng,
        )
        m |= coco_polygons_mask(polygons_to_coco([poly], h, w), h, w)
    return _Object(c, VOC_TO_COCO[c], None, m, crowd=True)


def sample_scene(
    rng: np.random.Generator,
    h: int,
    w: int,
    first_class: int,
    *,
    clutter: int = 0,
    crowd: bool = False,
    two_part_p: float = 0.0,
) -> list[_Object]:
    """1-3 objects of 1-2 VOC classes (one of them `first_class`) plus `clutter` non-VOC objects.

    Objects are large (radius 0.22-0.4 of the shorter side), as in most VOC photos: at the
    sample's ~160 px an object then spans 2-4 cells of FCN-32s's 32-px output grid, so even the
    coarsest net can place it (smaller objects are left to FCN-16s/8s's finer outputs).
    Returned in drawing order: a crowd first, then by decreasing area, so smaller objects lie on
    top; painting COCO annotations largest first reproduces the image.
    """
    n_obj = int(rng.integers(1, 4))
    n_cls = int(rng.integers(1, min(2, n_obj) + 1))
    others = [c for c in range(1, NUM_CLASSES) if c != first_class]
    classes = [first_class, *rng.choice(others, n_cls - 1, replace=False).tolist()]
    obj_classes = classes + rng.choice(classes, n_obj - n_cls).tolist()
    objects: list[_Object] = []
    for c in obj_classes:
        seg, m = _place_object(
            rng, h, w, class_shape(c), objects, r_range=(0.22, 0.4), two_part_p=two_part_p
        )
        objects.append(_Object(c, VOC_TO_COCO[c], seg, m))
    for _ in range(clutter):
        seg, m = _place_object(
            rng,
            h,
            w,
            int(rng.integers(len(_UNIT_SHAPES))),
            objects,
            r_range=(0.08, 0.2),
            two_part_p=0.0,
            # COCO polygons are amodal: clutter over a VOC object would be labelled with the
            # VOC class by coco_to_voc, so non-VOC objects avoid the others
            max_overlap=0.0,
        )
        objects.append(_Object(0, int(rng.choice(NON_VOC_COCO_IDS)), seg, m))
    objects.sort(key=lambda o: -int(o.mask.sum()))  # stable: ties keep creation order
    if crowd:
        objects.insert(0, _crowd_object(rng, h, w, int(rng.choice(classes))))
    covered = np.zeros((h, w), bool)
    for o in reversed(objects):  # what each object shows once everything above it is drawn
        o.visible = o.mask & ~covered
        covered |= o.mask
    return objects


# --- painting ---------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency noise in -1..1: a coarse random grid, bilinearly upsampled."""
    gh, gw = (int(v) for v in rng.integers(3, 7, 2))
    grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted (saturation <= 0.18) textured background, float32 (h, w, 3) in 0..1."""
    base = np.array(
        colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.03, 0.18), rng.uniform(0.35, 0.75)),
        np.float32,
    )
    yy, xx = np.ogrid[0:h, 0:w]  # broadcast: the same values as a full grid, without it
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(t) * xx / w + np.sin(t) * yy / h)[..., None] * rng.uniform(0.05, 0.15)
    lum = _smooth_noise(rng, h, w)[..., None] * 0.12
    chroma = np.stack([_smooth_noise(rng, h, w) for _ in range(3)], -1) * 0.025
    grain = rng.normal(0, 0.015, (h, w, 1)).astype(np.float32)
    return np.clip(base + grad + lum + chroma + grain, 0, 1)


def _bounding_box(where: np.ndarray) -> tuple[slice, slice] | None:
    """Row and column slices of the smallest box holding every True pixel (None: none)."""
    rows, cols = np.flatnonzero(where.any(1)), np.flatnonzero(where.any(0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def paint_class(img: np.ndarray, where: np.ndarray, c: int, rng: np.random.Generator) -> None:
    """Paint VOC class `c`'s appearance (colour, stripes, slight shading) into `img[where]`.

    The texture is computed inside `where`'s bounding box only; the random draws are those of
    the whole image, so the result does not depend on the box.
    """
    h, w = where.shape
    angle, period = class_stripes(c)
    phase, gain = rng.uniform(0, period), rng.uniform(0.9, 1.1)
    noise = rng.normal(0, 0.02, (h, w, 1))
    box = _bounding_box(where)
    if box is None:
        return
    yy, xx = np.mgrid[box].astype(np.float32)
    u = xx * np.cos(angle) + yy * np.sin(angle) + phase
    stripe = ((u / period) % 1.0) < 0.5
    shade = np.where(stripe, 0.8, 1.0)[..., None] * gain
    tex = class_colour(c) * shade + noise[box]
    inside = where[box]
    img[box][inside] = np.clip(tex, 0, 1)[inside]


def paint_clutter(img: np.ndarray, where: np.ndarray, rng: np.random.Generator) -> None:
    """Non-VOC objects: a muted checkerboard, so they read as background to a VOC model."""
    a = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.2), rng.uniform(0.3, 0.8)))
    b = a * rng.uniform(0.6, 0.85)
    cell = int(rng.integers(5, 11))
    box = _bounding_box(where)
    if box is None:
        return
    yy, xx = np.mgrid[box]
    check = ((yy // cell + xx // cell) % 2 == 0)[..., None]
    inside = where[box]
    img[box][inside] = np.where(check, a, b).astype(np.float32)[inside]


def render(
    rng: np.random.Generator, h: int, w: int, objects: list[_Object]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (uint8 RGB), semantic map (0..20) and instance map (0 = no VOC object) of a scene."""
    img = background(rng, h, w)
    sem = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.int32)
    for i, o in enumerate(objects, 1):
        if o.voc_class:
            paint_class(img, o.mask, o.voc_class, rng)
        else:
            paint_clutter(img, o.mask, rng)
        sem[o.mask] = o.voc_class
        inst[o.mask] = i if o.voc_class else 0
    return (img * 255 + 0.5).astype(np.uint8), sem, inst


def voc_label(sem: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """VOC SegmentationClass values: classes, with 255 on a band along every object outline."""
    label = sem.copy()
    label[boundary_band(inst)] = IGNORE_INDEX
    return label


# --- classification crops (the sample's stand-in for ImageNet) ----------------------------------


def classification_crop(seed: int, index: int, size: int, voc_class: int) -> np.ndarray:
    """A `size` x `size` uint8 RGB crop (H, W, 3) whose centre shows `voc_class` (0..20).

    The sample's ImageNet, labelled like ImageNet by the object in the middle: an object of
    `voc_class` covers the crop's centre (placed within 0.45-0.55 of the side), or, for class 0,
    the centre is background. 0-2 other VOC objects of random classes and 0-2 non-VOC
    distractors (`paint_clutter`) lie around it, kept clear of a disc of radius 0.12 x `size`
    about the centre. The label then depends on *where* things are, so fc8 applied as a
    convolution labels what is at the centre of each 224-pixel window instead of anything
    anywhere in it: the position selectivity FCN-32s needs on images hardly larger than that
    window. Object radii (0.14-0.3 of 224 px) span the sizes objects take in the resized
    scenes. Drawn from its own stream `(seed, STREAM_CROPS, index)`, so crop `index` is the
    same for any number of crops.

    Raises:
        ValueError: `voc_class` outside 0..20 or `size` < 33.
    """
    if not 0 <= voc_class < NUM_CLASSES:
        raise ValueError(f"voc_class must be in 0..{NUM_CLASSES - 1}, got {voc_class}")
    if size < 33:
        raise ValueError(f"crop size must be >= 33, got {size}")
    rng = np.random.default_rng([seed, STREAM_CROPS, index])
    yy, xx = np.mgrid[0:size, 0:size]
    half = size / 2
    # a stand-in over the centre that the others avoid (max_overlap 0), dropped before painting
    centre = _Object(0, 0, None, (yy - half) ** 2 + (xx - half) ** 2 <= (0.12 * size) ** 2)
    objects = [centre]
    if voc_class:
        seg, m = _place_object(
            rng,
            size,
            size,
            class_shape(voc_class),
            [],
            r_range=(0.14, 0.3),
            two_part_p=0.1,
            centre_range=(0.45, 0.55),
        )
        objects = [_Object(voc_class, VOC_TO_COCO[voc_class], seg, m)]
    for _ in range(int(rng.integers(0, 3))):
        other = int(rng.integers(1, NUM_CLASSES))
        seg, m = _place_object(
            rng,
            size,
            size,
            class_shape(other),
            objects,
            r_range=(0.14, 0.3),
            two_part_p=0.0,
            max_overlap=0.0,
        )
        objects.append(_Object(other, VOC_TO_COCO[other], seg, m))
    for _ in range(int(rng.integers(0, 3))):
        family = int(rng.integers(len(_UNIT_SHAPES)))
        seg, m = _place_object(
            rng, size, size, family, objects, r_range=(0.08, 0.2), two_part_p=0.0, max_overlap=0.0
        )
        objects.append(_Object(0, int(rng.choice(NON_VOC_COCO_IDS)), seg, m))
    objects = [o for o in objects if o is not centre]
    img, _, _ = render(rng, size, size, objects)
    return img


# --- encoding and archives --------------------------------------------------------------------


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png_p(label: np.ndarray) -> bytes:
    """Mode-P PNG with the full 256-entry VOC palette, as in SegmentationClass."""
    im = Image.frombytes(
        "P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes()
    )
    im.putpalette(voc_palette_flat())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def add_tar_members(tar: tarfile.TarFile, files: dict[str, bytes], mtime: int) -> int:
    """Add `files` (member name -> bytes) to `tar` with their parent directory entries, sorted,
    time `mtime`, owner 0 and fixed modes: identical archive bytes for identical `files`.
    Returns the number of entries written."""
    dirs: set[str] = set()
    for n in files:
        parts = Path(n).parts[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    entries = sorted([(d + "/", None) for d in dirs] + list(files.items()))
    for name, data in entries:
        info = tarfile.TarInfo(name.rstrip("/"))
        info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
        if data is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return len(entries)


def _write_tar(path: Path, files: dict[str, bytes]) -> int:
    """Uncompressed GNU tar with parent directory entries, sorted members, fixed metadata."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        return add_tar_members(tar, files, VOC_MTIME)


def _write_zip(path: Path, files: dict[str, bytes], *, deflate: bool) -> int:
    """Zip with its top-level directory entry, sorted members and fixed timestamps."""
    dirs = sorted({n.split("/")[0] + "/" for n in files})
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for d in dirs:
            info = zipfile.ZipInfo(d, date_time=COCO_ZIP_TIME)
            info.create_system, info.external_attr = 3, (0o40755 << 16) | 0x10
            zf.writestr(info, b"")
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=COCO_ZIP_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(info, files[name])
    return len(dirs) + len(files)


def _check_args(
    target: Path, counts: dict[str, tuple[int, int]], min_side: int, max_side: int
) -> None:
    """Reject bad arguments before any work, naming the output and the argument."""
    for key, (v, lo) in counts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{target}: {key} must be an integer >= {lo}, got {v!r}")
    if not 33 <= min_side <= max_side:
        raise ValueError(
            f"{target}: image sides need 33 <= min_side <= max_side, got {min_side}..{max_side}"
        )


def _class_cycle(rng: np.random.Generator, n: int) -> list[int]:
    """First class of each of `n` images: every VOC class once per 20 images (all 20 when n >= 20)."""
    out: list[int] = []
    while len(out) < n:
        out += (rng.permutation(NUM_CLASSES - 1) + 1).tolist()
    return out[:n]


def _image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    h, w = rng.integers(min_side, max_side + 1, 2)
    return int(h), int(w)


# --- VOC --------------------------------------------------------------------------------------


def make_voc_sample(
    out_tar: Path,
    *,
    seed: int,
    n_train: int,
    n_val: int,
    min_side: int,
    max_side: int,
    n_unlabelled: int = 2,
) -> dict[str, Any]:
    """Write a synthetic VOCtrainval_11-May-2012.tar with the real member layout.

    `n_unlabelled` extra JPEGs have no SegmentationClass PNG and are in no list, like most of the
    real archive's 17k images. Returns counts and the classes present per split.
    """
    out_tar = Path(out_tar)
    counts = {"n_train": (n_train, 1), "n_val": (n_val, 1), "n_unlabelled": (n_unlabelled, 0)}
    _check_args(out_tar, counts, min_side, max_side)
    total = n_train + n_val + n_unlabelled
    if total > 5 * 8000:
        raise ValueError(f"{out_tar}: at most 40000 images fit VOC's id scheme, asked for {total}")
    rng = np.random.default_rng([seed, STREAM_VOC])
    ids: set[str] = set()
    while len(ids) < total:  # real-looking ids: <year>_<6 digits>
        ids.add(f"{int(rng.integers(2007, 2012))}_{int(rng.integers(0, 8000)):06d}")
    order = rng.permutation(sorted(ids)).tolist()
    splits = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
    split_of = ["train"] * n_train + ["val"] * n_val + [None] * n_unlabelled
    firsts = _class_cycle(rng, n_train) + _class_cycle(rng, n_val)
    firsts += rng.integers(1, NUM_CLASSES, n_unlabelled).tolist()

    files: dict[str, bytes] = {}
    classes: dict[str, set[int]] = {"train": set(), "val": set()}
    n_objects = 0
    for k, (img_id, split) in enumerate(zip(order, split_of, strict=True)):
        r = np.random.default_rng([seed, STREAM_VOC, k])
        h, w = _image_size(r, min_side, max_side)
        objs = sample_scene(r, h, w, int(firsts[k]), clutter=int(r.random() < 0.3), two_part_p=0.15)
        img, sem, inst = render(r, h, w, objs)
        files[f"{VOC_ROOT}/JPEGImages/{img_id}.jpg"] = _jpeg(Image.fromarray(img))
        if split is None:
            continue
        label = voc_label(sem, inst)
        files[f"{VOC_ROOT}/SegmentationClass/{img_id}.png"] = _png_p(label)
        classes[split].update(int(v) for v in np.unique(label) if 0 < v < NUM_CLASSES)
        n_objects += sum(1 for o in objs if o.voc_class)
    for name, lst in (*splits.items(), ("trainval", splits["train"] + splits["val"])):
        files[f"{VOC_ROOT}/ImageSets/Segmentation/{name}.txt"] = "".join(
            f"{i}\n" for i in sorted(lst)
        ).encode()
    members = _write_tar(out_tar, files)
    return {
        "archive": str(out_tar),
        "train": n_train,
        "val": n_val,
        "unlabelled_images": n_unlabelled,
        "objects": n_objects,
        "members": members,
        "classes": {s: sorted(v) for s, v in classes.items()},
    }


# --- COCO -------------------------------------------------------------------------------------


def _coco_annotation(o: _Object, ann_id: int, image_id: int, h: int, w: int) -> dict[str, Any]:
    if o.crowd:  # COCO stores crowds as uncompressed RLE of the region (what is visible of it)
        seg: Any = rle_uncompressed(o.visible)
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        seg = o.segmentation
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": o.coco_id,
        "segmentation": seg,
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(o.crowd),
    }


def _coco_features(rng: np.random.Generator, n: int) -> list[dict[str, bool]]:
    """Which images of a split are empty, hold a crowd or a non-VOC object (each at least once)."""
    feats = [
        {"empty": False, "crowd": rng.random() < 0.15, "clutter": rng.random() < 0.3}
        for _ in range(n)
    ]
    perm = rng.permutation(n).tolist()
    n_empty = 0 if n < 4 else (1 if n < 20 else 2)
    for i in perm[:n_empty]:
        feats[i] = {"empty": True, "crowd": False, "clutter": False}
    rest = perm[n_empty:]
    if rest:
        feats[rest[0]]["crowd"] = True
        feats[rest[-1]]["clutter"] = True
    return feats


def make_coco_sample(
    out_dir: Path, *, seed: int, n_train: int, n_val: int, min_side: int, max_side: int
) -> dict[str, Any]:
    """Write train2017.zip, val2017.zip and annotations_trainval2017.zip into `out_dir`.

    Annotations are real COCO instances JSON: polygons (some with two parts), uncompressed-RLE
    crowds, non-VOC categories, overlapping instances and a few images without annotations.
    One image is grayscale and one CMYK (when there are two images), as in the real COCO.
    """
    out_dir = Path(out_dir)
    _check_args(out_dir, {"n_train": (n_train, 0), "n_val": (n_val, 0)}, min_side, max_side)
    rng = np.random.default_rng([seed, STREAM_COCO])
    n_all = n_train + n_val
    image_ids = sorted(rng.choice(np.arange(1, 581930), n_all, replace=False).tolist())
    image_ids = rng.permutation(image_ids).tolist()
    split_of = ["train2017"] * n_train + ["val2017"] * n_val
    feats = _coco_features(rng, n_train) + _coco_features(rng, n_val)
    firsts = [0] * n_all  # every VOC class leads some non-empty image of each split
    for s in ("train2017", "val2017"):
        idx = [i for i in range(n_all) if split_of[i] == s and not feats[i]["empty"]]
        for i, c in zip(idx, _class_cycle(rng, len(idx)), strict=True):
            firsts[i] = c
    # one grayscale and one CMYK JPEG, in train when it has room (downstream converts to RGB)
    pool = list(range(n_train)) if n_train >= 2 else list(range(n_all))
    modes = ["RGB"] * n_all
    if len(pool) >= 2:
        gray, cmyk = rng.choice(pool, 2, replace=False).tolist()
        modes[gray], modes[cmyk] = "L", "CMYK"

    zips: dict[str, dict[str, bytes]] = {"train2017": {}, "val2017": {}}
    coco: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, int]] = {}
    for s in zips:
        coco[s] = {
            "info": {
                "description": f"Synthetic sample in COCO 2017 layout (pipeline/data/sample.py, seed {seed})",
                "url": "",
                "version": "1.0",
                "year": 2017,
                "contributor": "fcn-pipeline",
                "date_created": "2017/09/01",
            },
            "licenses": [{"url": "", "id": 1, "name": "Synthetic data, no restrictions"}],
            "images": [],
            "annotations": [],
            "categories": [dict(c) for c in COCO_CATEGORIES],
        }
        stats[s] = dict.fromkeys(
            (
                "images",
                "annotations",
                "polygon",
                "crowd",
                "non_voc",
                "empty_images",
                "grayscale",
                "cmyk",
            ),
            0,
        )
    ann_id = int(rng.integers(100000, 900000))
    for k in range(n_all):
        s, image_id, f = split_of[k], image_ids[k], feats[k]
        r = np.random.default_rng([seed, STREAM_COCO, k])
        h, w = _image_size(r, min_side, max_side)
        objs = (
            []
            if f["empty"]
            else sample_scene(
                r, h, w, firsts[k], clutter=int(f["clutter"]), crowd=f["crowd"], two_part_p=0.25
            )
        )
        img, _, _ = render(r, h, w, objs)
        file_name = f"{image_id:012d}.jpg"
        zips[s][f"{s}/{file_name}"] = _jpeg(Image.fromarray(img).convert(modes[k]))
        coco[s]["images"].append(
            {
                "license": 1,
                "file_name": file_name,
                "height": h,
                "width": w,
                "date_captured": "2017-01-01 00:00:00",
                "id": image_id,
            }
        )
        st = stats[s]
        st["images"] += 1
        st["empty_images"] += not objs
        st["grayscale"] += modes[k] == "L"
        st["cmyk"] += modes[k] == "CMYK"
        for o in objs:
            coco[s]["annotations"].append(_coco_annotation(o, ann_id, image_id, h, w))
            ann_id += 1
            st["annotations"] += 1
            st["crowd"] += o.crowd
            st["polygon"] += not o.crowd
            st["non_voc"] += o.voc_class == 0

    out_dir.mkdir(parents=True, exist_ok=True)
    for s, files in zips.items():
        _write_zip(out_dir / f"{s}.zip", files, deflate=False)  # JPEGs do not compress
    ann_files = {
        f"annotations/instances_{s}.json": json.dumps(coco[s], separators=(",", ":")).encode()
        for s in zips
    }
    _write_zip(out_dir / "annotations_trainval2017.zip", ann_files, deflate=True)
    return {
        "dir": str(out_dir),
        "files": ["train2017.zip", "val2017.zip", "annotations_trainval2017.zip"],
        **stats,
    }


# --- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.data.sample",
        description="Generate the synthetic VOC 2012 tar and COCO 2017 zips of the `sample` profile "
        "(same member layout as the real downloads; same arguments give byte-identical files).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("data/raw"), help="writes <out>/voc and <out>/coco"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voc-train", type=int, default=40)
    p.add_argument("--voc-val", type=int, default=16)
    p.add_argument("--coco-train", type=int, default=40)
    p.add_argument("--coco-val", type=int, default=8)
    p.add_argument("--min-side", type=int, default=120)
    p.add_argument("--max-side", type=int, default=240)
    a = p.parse_args(argv)
    sides = {"min_side": a.min_side, "max_side": a.max_side}
    voc = make_voc_sample(
        a.out / "voc" / "VOCtrainval_11-May-2012.tar",
        seed=a.seed,
        n_train=a.voc_train,
        n_val=a.voc_val,
        **sides,
    )
    coco = make_coco_sample(
        a.out / "coco", seed=a.seed, n_train=a.coco_train, n_val=a.coco_val, **sides
    )
    print(json.dumps({"voc": voc, "coco": coco}, indent=2))


if __name__ == "__main__":
    main()
