"""Fault kinds other tools' users reported, each replayed on an input built here.

Every expected value is computed independently of the code under test: pycocotools'
`frPyObjects`/`decode` for polygons, numpy slicing for boxes and bit shifts, the arrays the
test itself wrote for label maps.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.classes import COCO_NAMES
from pipeline.data import coco_annotations as ca
from pipeline.data import coco_json as cj
from pipeline.data import coco_paint as cp
from pipeline.data import coco_voc as cv
from pipeline.data.datasets import decode_image_rgb, decode_label
from pipeline.data.shards import ShardReader
from pipeline.inference.predict import find_images, load_rgb, predict_files
from tests.helpers import TinyFCN
from tests.repo_utils import write_tiny_params

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val2017"
CATEGORIES = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_NAMES.items()]


# --- helpers ---------------------------------------------------------------------------------


def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _coco_dir(tmp: Path, instances: dict, split: str = SPLIT) -> Path:
    """A raw COCO folder: annotations_trainval2017.zip + <split>.zip with every listed image."""
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(tmp / "annotations_trainval2017.zip", "w") as zf:
        zf.writestr(f"annotations/instances_{split}.json", json.dumps(instances))
    with zipfile.ZipFile(tmp / f"{split}.zip", "w") as zf:
        for i, img in enumerate(instances["images"]):
            zf.writestr(f"{split}/{img['file_name']}", _jpeg(img["height"], img["width"], i))
    return tmp


def _convert(raw: Path, out: Path, **kw) -> dict:
    return cv.convert_split(
        raw / "annotations_trainval2017.zip",
        raw / f"{SPLIT}.zip",
        SPLIT,
        out,
        min_pixels=kw.pop("min_pixels", 0),
        workers=1,
        shard_size=10,
        progress=False,
        **kw,
    )


def _labels(out: Path) -> dict[int, np.ndarray]:
    r = ShardReader(out)
    res = {r.meta(i)["image_id"]: cp.label_png_to_array(r.blob(i, "label")) for i in range(len(r))}
    r.close()
    return res


def _poly_mask(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def _ann(ident: int, image_id: int, cat: int, seg, bbox=None, **kw) -> dict:
    a = {"id": ident, "image_id": image_id, "category_id": cat, "iscrowd": 0, "segmentation": seg}
    if bbox is not None:
        a["bbox"] = bbox
    return {**a, **kw}


# --- A: an object the converter cannot fully rasterise never becomes background ---------------


def test_unusable_parts_are_dropped_and_unusable_objects_marked_ignore(tmp_path):
    h, w = 100, 120
    square = [20.0, 20.0, 60.0, 20.0, 60.0, 60.0, 20.0, 60.0]
    dog = [70.0, 10.0, 110.0, 10.0, 110.0, 40.0, 70.0, 40.0]
    off_image = [200.0, 200.0, 220.0, 200.0, 220.0, 220.0]
    sheep = [70.0, 50.0, 90.0, 50.0, 90.0, 65.0, 70.0, 65.0]
    nan = float("nan")
    anns = [
        _ann(10, 1, 1, [square, [80.0, 80.0, 81.0, 81.0]]),  # person + a 2-point part
        _ann(11, 1, 18, [dog]),  # dog, fine
        _ann(12, 1, 17, [[nan] * 6], bbox=[5, 70, 20, 20]),  # cat: NaN only -> bbox ignore
        _ann(13, 1, 19, [], bbox=[30, 70, 10, 10]),  # horse: empty -> bbox ignore
        _ann(14, 1, 6, {"size": [50, 50], "counts": [2500]}, bbox=[95, 60, 20, 30]),  # bus
        _ann(15, 1, 20, [off_image, sheep]),  # sheep: one part entirely off the image
        _ann(16, 1, 7, [off_image], bbox=[0, 0, 4, 4]),  # car: every part off the image
        _ann(20, 2, 1, None),  # image 2: a person with neither segmentation nor bbox
        _ann(21, 2, 18, [dog]),
    ]
    for a in anns[:7]:
        a["area"] = 1.0
    instances = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": h, "width": w},
            {"id": 2, "file_name": "b.jpg", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    report = _convert(_coco_dir(tmp_path / "raw", instances), tmp_path / "out")
    labels = _labels(tmp_path / "out")

    want = np.zeros((h, w), np.uint8)
    want[_poly_mask([square], h, w)] = 15  # the square alone, by pycocotools
    want[_poly_mask([dog], h, w)] = 12
    want[_poly_mask([sheep], h, w)] = 17
    want[70:90, 5:25] = 255  # cat bbox
    want[70:80, 30:40] = 255  # horse bbox
    want[60:90, 95:115] = 255  # bus bbox (clipped to the image: it is 120 wide)
    want[0:4, 0:4] = 255  # car bbox
    np.testing.assert_array_equal(labels[1], want)
    assert np.count_nonzero(labels[1] == 15) == 1600  # 40 x 40, as detectron2 rasterises it

    parts = report["voc_objects_parts_dropped_by_reason"]
    assert parts[ca.SKIP_SHORT_POLYGON]["ids"] == [10]
    assert parts[ca.SKIP_OFF_IMAGE]["ids"] == [15]
    marked = {r: v["ids"] for r, v in report["voc_objects_marked_ignore_by_reason"].items()}
    assert marked[ca.SKIP_BAD_SEGMENTATION] == [12, 14]
    assert marked[ca.SKIP_NO_SEGMENTATION] == [13, 20]
    assert marked[ca.SKIP_OFF_IMAGE] == [16]
    assert report["annotations_voc_marked_ignore"] == 5
    # image 2: the person cannot be located, so the image is dropped rather than half labelled
    assert 2 not in labels
    assert report["images_dropped"][cv.DROP_NO_REGION]["ids"] == [2]


# --- B: a commonly omitted field; a mostly rejected split fails --------------------------------


def _stage_params(tmp: Path, fraction: float) -> Path:
    return write_tiny_params(
        tmp / "params.yaml",
        {
            "coco_to_voc.splits": [SPLIT],
            "coco_to_voc.min_pixels": 1,
            "coco_to_voc.workers": 1,
            "coco_to_voc.max_rejected_fraction": fraction,
        },
    )


def _run_stage(params: Path, raw: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.coco_to_voc", "--params", str(params)]
    cmd += ["--raw-dir", str(raw), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_iscrowd_is_0_and_a_mostly_rejected_split_fails(tmp_path):
    rng = np.random.default_rng(17)
    h, w = 48, 64
    images, anns = [], []
    for i in range(1, 4):
        x0, y0 = (int(v) for v in rng.integers(2, 20, 2))
        poly = [x0, y0, x0 + 30.0, y0, x0 + 30.0, y0 + 20.0, x0, y0 + 20.0]
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": h, "width": w})
        ann = _ann(100 + i, i, 18, [poly])
        del ann["iscrowd"]  # as many exporters write it
        anns.append(ann)
    instances = {"images": images, "annotations": anns, "categories": CATEGORIES}
    raw = _coco_dir(tmp_path / "raw", instances)
    res = _run_stage(_stage_params(tmp_path, 0.01), raw, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    labels = _labels(tmp_path / "out" / SPLIT)
    assert sorted(labels) == [1, 2, 3]
    for ann in anns:
        dog = _poly_mask(ann["segmentation"], h, w)
        assert np.count_nonzero(labels[ann["image_id"]] == 12) == np.count_nonzero(dog) == 600

    # every annotation rejected (ids that are not integers): exit 1, reason counts named
    for ann in anns:
        ann["image_id"] = str(ann["image_id"])
    raw = _coco_dir(tmp_path / "raw2", instances)
    res = _run_stage(_stage_params(tmp_path, 0.01), raw, tmp_path / "out2")
    assert res.returncode == 1
    assert "3 of 3 annotations rejected" in res.stderr
    assert "'malformed_annotation': 3" in res.stderr and "max_rejected_fraction" in res.stderr
    assert not (tmp_path / "out2").exists()


# --- C: high-bit-depth images: one policy for predict and the training decoder -----------------


def test_high_bit_depth_images_follow_one_policy(tmp_path):
    rng = np.random.default_rng(3)
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    noise = rng.integers(0, 65536, (8, 256), dtype=np.uint16)
    for name, arr in (("ramp16.png", ramp), ("noise16.png", noise)):
        path = tmp_path / name
        Image.fromarray(arr).save(path)  # mode I;16 -> a 16-bit greyscale PNG
        assert path.read_bytes()[24] == 16
        want = np.repeat((arr >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
        got = load_rgb(path)  # what predict reads
        np.testing.assert_array_equal(got, want)
        train = decode_image_rgb(path.read_bytes(), name)  # what preprocess/training read
        np.testing.assert_array_equal(train.permute(1, 2, 0).numpy(), want)
    assert len(np.unique(load_rgb(tmp_path / "ramp16.png"))) == 256

    for mode, arr in (("F", rng.random((8, 8), dtype=np.float32)), ("I", noise.astype(np.int32))):
        path = tmp_path / f"{mode}.tiff"
        Image.fromarray(arr).save(path)
        with pytest.raises(ValueError, match=rf"{mode}\.tiff: .*PIL mode '{mode}'"):
            load_rgb(path)


# --- D: palette label maps of any bit depth carry class indices --------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_depth_palette_labels_are_read_as_indices(bits):
    rng = np.random.default_rng(bits)
    indices = rng.integers(0, 2**bits, (30, 41), dtype=np.uint8)
    im = Image.fromarray(indices, "P")
    im.putpalette(rng.integers(0, 256, 3 * 2**bits).tolist())
    buf = io.BytesIO()
    im.save(buf, "PNG", bits=bits)
    data = buf.getvalue()
    assert (data[24], data[25]) == (bits, 3)  # really a low-bit palette PNG
    np.testing.assert_array_equal(decode_label(data, "x.png").numpy(), indices)


def test_low_bit_depth_grayscale_labels_are_refused():
    buf = io.BytesIO()
    Image.fromarray(np.eye(8, dtype=bool)).save(buf, "PNG")  # mode 1: 1-bit greyscale
    assert buf.getvalue()[24:26] == b"\x01\x00"
    with pytest.raises(ValueError, match=r"x\.png: .*bit depth 1, colour type 0"):
        decode_label(buf.getvalue(), "x.png")


# --- E: predict never reads back its own outputs -----------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("out_name", ["pred", "."])
def test_predict_reruns_are_idempotent(tmp_path, out_name):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(_jpeg(24, 32, 1))
    (photos / "sub" / "b.jpg").write_bytes(_jpeg(20, 28, 2))
    out = photos / out_name
    model = TinyFCN().eval()
    snapshots = []
    for _ in range(2):
        items, missing = find_images([photos], out)
        assert sorted(str(stem) for _, stem in items) == ["a", "sub/b"] and not missing
        result = predict_files(model, items, out, progress=False)
        assert not result.failed and len(result.written) == 2
        snapshots.append(_snapshot(photos))
    assert snapshots[0] == snapshots[1]  # same files, same bytes
    assert len(snapshots[0]) == 2 + 2 * 2  # two photos, a label map and an overlay for each


# --- F: COCO category ids are checked against their names --------------------------------------


def test_renumbered_categories_are_refused(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}],
        "annotations": [_ann(1, 1, 1, [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0]])],
        # an exporter that numbered its own classes: 1 = bicycle, 2 = person
        "categories": [{"id": 1, "name": "bicycle"}, {"id": 2, "name": "person"}],
    }
    raw = _coco_dir(tmp_path / "raw", instances)
    with pytest.raises(
        cj.CocoFormatError,
        match=r"annotations_trainval2017\.zip:annotations/instances_val2017\.json: category id 1 "
        r"is named 'bicycle', expected 'person'",
    ):
        _convert(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # COCO's own spellings (case aside) pass
    instances["categories"] = [{"id": 1, "name": "Person"}, {"id": 2, "name": "bicycle"}]
    report = _convert(_coco_dir(tmp_path / "raw2", instances), tmp_path / "out2")
    assert report["images_kept"] == 1


# --- smaller: inputs checked first, with the stage that makes them -----------------------------


def test_stages_name_the_dvc_stage_of_a_missing_input(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module, args, stage in (
        ("stages.coco_to_voc", ["--raw-dir", str(tmp_path / "none")], "download_coco"),
        ("stages.preprocess", ["--voc-tar", str(tmp_path / "none.tar")], "download_voc"),
        ("stages.evaluate", ["--models", str(tmp_path)], "train_fcn32s"),
    ):
        cmd = [sys.executable, "-m", module, *args, "--out", str(tmp_path / "o"), "--no-progress"]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1, (module, res.stderr)
        assert f"run `dvc repro {stage}`" in res.stderr and "Traceback" not in res.stderr
