"""Offline sample data: synthetic VOC 2012 / COCO 2017 archives with the real internal layout.

The `sample` profile must run every later stage on exactly the code paths of the `full` profile,
so the generators below write the same containers the downloads deliver:

    VOCtrainval_11-May-2012.tar   VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/...}
    train2017.zip, val2017.zip    train2017/<012d>.jpg, val2017/<012d>.jpg
    annotations_trainval2017.zip  annotations/instances_{train,val}2017.json

The scenes are drawn by `pipeline.data.sample_scene` (one fixed appearance per VOC class) and
packed by `pipeline.data.sample_pack`. Label maps and COCO masks come from the very masks the
image was painted with. Everything is drawn from `numpy.random.Generator`s seeded by
`(seed, stream, index)`, and archive members have fixed times, owners and order, so the same
arguments give byte-identical archives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.classes import COCO_CATEGORIES, NUM_CLASSES
from pipeline.data.sample_pack import (
    encode_jpeg,
    encode_voc_label_png,
    write_coco_zip,
    write_voc_tar,
)
from pipeline.data.sample_scene import (
    STREAM_COCO,
    STREAM_VOC,
    SceneObject,
    render,
    rle_uncompressed,
    sample_scene,
    voc_label,
)

VOC_ROOT = "VOCdevkit/VOC2012"
COCO_SPLITS = ("train2017", "val2017")


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


def _voc_ids(rng: np.random.Generator, total: int) -> list[str]:
    """`total` distinct real-looking VOC ids (`<year>_<6 digits>`, 2007-2011), shuffled."""
    ids: set[str] = set()
    while len(ids) < total:
        ids.add(f"{int(rng.integers(2007, 2012))}_{int(rng.integers(0, 8000)):06d}")
    return rng.permutation(sorted(ids)).tolist()


def _voc_lists(splits: dict[str, list[str]]) -> dict[str, bytes]:
    """ImageSets/Segmentation/{train,val,trainval}.txt members: sorted ids, one per line."""
    files = {}
    for name, lst in (*splits.items(), ("trainval", splits["train"] + splits["val"])):
        files[f"{VOC_ROOT}/ImageSets/Segmentation/{name}.txt"] = "".join(
            f"{i}\n" for i in sorted(lst)
        ).encode()
    return files


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
    order = _voc_ids(rng, total)
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
        files[f"{VOC_ROOT}/JPEGImages/{img_id}.jpg"] = encode_jpeg(Image.fromarray(img))
        if split is None:
            continue
        label = voc_label(sem, inst)
        files[f"{VOC_ROOT}/SegmentationClass/{img_id}.png"] = encode_voc_label_png(label)
        classes[split].update(int(v) for v in np.unique(label) if 0 < v < NUM_CLASSES)
        n_objects += sum(1 for o in objs if o.voc_class)
    files.update(_voc_lists(splits))
    members = write_voc_tar(out_tar, files)
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


def _coco_annotation(o: SceneObject, ann_id: int, image_id: int, h: int, w: int) -> dict[str, Any]:
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


COCO_STAT_KEYS = (
    "images",
    "annotations",
    "polygon",
    "crowd",
    "non_voc",
    "empty_images",
    "grayscale",
    "cmyk",
)


def _coco_first_classes(
    rng: np.random.Generator, split_of: list[str], feats: list[dict[str, bool]]
) -> list[int]:
    """Leading VOC class of each image (0 for an empty one): every VOC class leads some
    non-empty image of each split (`_class_cycle` per split, train first)."""
    firsts = [0] * len(split_of)
    for s in COCO_SPLITS:
        idx = [i for i, split in enumerate(split_of) if split == s and not feats[i]["empty"]]
        for i, c in zip(idx, _class_cycle(rng, len(idx)), strict=True):
            firsts[i] = c
    return firsts


def _coco_jpeg_modes(rng: np.random.Generator, n_train: int, n_all: int) -> list[str]:
    """PIL mode of each JPEG: one grayscale ("L") and one CMYK, as in the real COCO, in train
    when it has room (downstream converts both to RGB); all "RGB" with fewer than two images."""
    pool = list(range(n_train)) if n_train >= 2 else list(range(n_all))
    modes = ["RGB"] * n_all
    if len(pool) >= 2:
        gray, cmyk = rng.choice(pool, 2, replace=False).tolist()
        modes[gray], modes[cmyk] = "L", "CMYK"
    return modes


def _empty_instances(seed: int) -> dict[str, Any]:
    """A COCO 2017 instances JSON skeleton (info, licenses, the real 80 categories)."""
    return {
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


def _coco_image_entry(file_name: str, h: int, w: int, image_id: int) -> dict[str, Any]:
    """One `images` entry, with COCO's keys in COCO's order."""
    return {
        "license": 1,
        "file_name": file_name,
        "height": h,
        "width": w,
        "date_captured": "2017-01-01 00:00:00",
        "id": image_id,
    }


def _coco_scene(
    r: np.random.Generator, feats: dict[str, bool], first: int, min_side: int, max_side: int
) -> tuple[int, int, list[SceneObject], np.ndarray]:
    """(h, w, objects, uint8 RGB image) of one COCO sample image, drawn from its own `r`."""
    h, w = _image_size(r, min_side, max_side)
    objs = (
        []
        if feats["empty"]
        else sample_scene(
            r, h, w, first, clutter=int(feats["clutter"]), crowd=feats["crowd"], two_part_p=0.25
        )
    )
    img, _, _ = render(r, h, w, objs)
    return h, w, objs, img


def _count_coco_image(st: dict[str, int], objs: list[SceneObject], mode: str) -> None:
    """Add one image and its objects to a split's `COCO_STAT_KEYS` counts."""
    st["images"] += 1
    st["empty_images"] += not objs
    st["grayscale"] += mode == "L"
    st["cmyk"] += mode == "CMYK"
    for o in objs:
        st["annotations"] += 1
        st["crowd"] += o.crowd
        st["polygon"] += not o.crowd
        st["non_voc"] += o.voc_class == 0


def _write_coco_archives(
    out_dir: Path, zips: dict[str, dict[str, bytes]], coco: dict[str, dict[str, Any]]
) -> None:
    """`<split>.zip` of the JPEGs (stored: JPEGs do not compress) and the deflated
    annotations_trainval2017.zip of the compact instances JSONs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, files in zips.items():
        write_coco_zip(out_dir / f"{s}.zip", files, deflate=False)
    ann_files = {
        f"annotations/instances_{s}.json": json.dumps(coco[s], separators=(",", ":")).encode()
        for s in zips
    }
    write_coco_zip(out_dir / "annotations_trainval2017.zip", ann_files, deflate=True)


def make_coco_sample(
    out_dir: Path, *, seed: int, n_train: int, n_val: int, min_side: int, max_side: int
) -> dict[str, Any]:
    """Write train2017.zip, val2017.zip and annotations_trainval2017.zip into `out_dir`.

    Annotations are real COCO instances JSON: polygons (some with two parts), uncompressed-RLE
    crowds, non-VOC categories, overlapping instances and a few images without annotations.
    One image is grayscale and one CMYK (when there are two images), as in the real COCO.
    Returns the file names and per-split counts (`COCO_STAT_KEYS`). Raises ValueError for bad
    counts or sides (`_check_args`).
    """
    out_dir = Path(out_dir)
    _check_args(out_dir, {"n_train": (n_train, 0), "n_val": (n_val, 0)}, min_side, max_side)
    rng = np.random.default_rng([seed, STREAM_COCO])
    n_all = n_train + n_val
    image_ids = sorted(rng.choice(np.arange(1, 581930), n_all, replace=False).tolist())
    image_ids = rng.permutation(image_ids).tolist()
    split_of = [COCO_SPLITS[0]] * n_train + [COCO_SPLITS[1]] * n_val
    feats = _coco_features(rng, n_train) + _coco_features(rng, n_val)
    firsts = _coco_first_classes(rng, split_of, feats)
    modes = _coco_jpeg_modes(rng, n_train, n_all)
    zips: dict[str, dict[str, bytes]] = {s: {} for s in COCO_SPLITS}
    coco = {s: _empty_instances(seed) for s in COCO_SPLITS}
    stats = {s: dict.fromkeys(COCO_STAT_KEYS, 0) for s in COCO_SPLITS}
    ann_id = int(rng.integers(100000, 900000))
    for k in range(n_all):
        s, image_id = split_of[k], image_ids[k]
        r = np.random.default_rng([seed, STREAM_COCO, k])
        h, w, objs, img = _coco_scene(r, feats[k], firsts[k], min_side, max_side)
        file_name = f"{image_id:012d}.jpg"
        zips[s][f"{s}/{file_name}"] = encode_jpeg(Image.fromarray(img).convert(modes[k]))
        coco[s]["images"].append(_coco_image_entry(file_name, h, w, image_id))
        for o in objs:
            coco[s]["annotations"].append(_coco_annotation(o, ann_id, image_id, h, w))
            ann_id += 1
        _count_coco_image(stats[s], objs, modes[k])
    _write_coco_archives(out_dir, zips, coco)
    return {
        "dir": str(out_dir),
        "files": ["train2017.zip", "val2017.zip", "annotations_trainval2017.zip"],
        **stats,
    }


# --- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Command line: write the sample VOC tar and COCO zips under `--out`; print their counts."""
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
