"""Scenes of the offline sample: VOC-class objects drawn with one fixed appearance per class.

Each VOC class has one fixed appearance (a saturated base colour, a shape family and a stripe
pattern) on muted, low-saturation backgrounds, so a tiny FCN learns the task in a minute of CPU.
Label maps and COCO masks come from the very masks the image was painted with: `sample_scene`
places the objects, `render` paints them, `voc_label` draws VOC's void band. Every draw comes
from the `numpy.random.Generator` the caller passes, in a fixed order, so a seed gives the same
scene. `classification_crop` is the sample's stand-in for ImageNet.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES, VOC_TO_COCO

# separate random streams: VOC images, COCO images and the backbone's classification crops differ
STREAM_VOC, STREAM_COCO, STREAM_CROPS = 0, 1, 2

# COCO classes that are background for VOC: traffic light, bench, umbrella, cup, laptop, clock.
NON_VOC_COCO_IDS: tuple[int, ...] = (10, 15, 28, 47, 73, 85)


BOUNDARY_RADIUS = 2  # VOC's void band: 2 px either side of an outline, 4-5 px wide in all


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


@dataclass
class SceneObject:
    """One object of a scene: its classes, COCO polygons and masks."""

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
    placed: list[SceneObject],
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


def _crowd_object(rng: np.random.Generator, h: int, w: int, c: int) -> SceneObject:
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
    return SceneObject(c, VOC_TO_COCO[c], None, m, crowd=True)


def sample_scene(
    rng: np.random.Generator,
    h: int,
    w: int,
    first_class: int,
    *,
    clutter: int = 0,
    crowd: bool = False,
    two_part_p: float = 0.0,
) -> list[SceneObject]:
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
    objects: list[SceneObject] = []
    for c in obj_classes:
        seg, m = _place_object(
            rng, h, w, class_shape(c), objects, r_range=(0.22, 0.4), two_part_p=two_part_p
        )
        objects.append(SceneObject(c, VOC_TO_COCO[c], seg, m))
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
        objects.append(SceneObject(0, int(rng.choice(NON_VOC_COCO_IDS)), seg, m))
    objects.sort(key=lambda o: -int(o.mask.sum()))  # stable: ties keep creation order
    if crowd:
        objects.insert(0, _crowd_object(rng, h, w, int(rng.choice(classes))))
    covered = np.zeros((h, w), bool)
    for o in reversed(objects):  # what each object shows once everything above it is drawn
        o.visible = o.mask & ~covered
        covered |= o.mask
    return objects


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
    rng: np.random.Generator, h: int, w: int, objects: list[SceneObject]
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
    objects = _crop_objects(rng, size, voc_class)
    img, _, _ = render(rng, size, size, objects)
    return img


def _crop_objects(rng: np.random.Generator, size: int, voc_class: int) -> list[SceneObject]:
    """The objects of one classification crop (`classification_crop`), in drawing order."""
    yy, xx = np.mgrid[0:size, 0:size]
    half = size / 2
    # a stand-in over the centre that the others avoid (max_overlap 0), dropped before painting
    centre = SceneObject(0, 0, None, (yy - half) ** 2 + (xx - half) ** 2 <= (0.12 * size) ** 2)
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
        objects = [SceneObject(voc_class, VOC_TO_COCO[voc_class], seg, m)]
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
        objects.append(SceneObject(other, VOC_TO_COCO[other], seg, m))
    for _ in range(int(rng.integers(0, 3))):
        family = int(rng.integers(len(_UNIT_SHAPES)))
        seg, m = _place_object(
            rng, size, size, family, objects, r_range=(0.08, 0.2), two_part_p=0.0, max_overlap=0.0
        )
        objects.append(SceneObject(0, int(rng.choice(NON_VOC_COCO_IDS)), seg, m))
    return [o for o in objects if o is not centre]
