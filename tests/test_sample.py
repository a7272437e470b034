"""The offline sample archives: real layout, valid labels and COCO JSON, determinism."""

from __future__ import annotations

import colorsys
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.classes import (
    COCO_CATEGORIES,
    COCO_TO_VOC,
    IGNORE_INDEX,
    NUM_CLASSES,
    voc_palette_flat,
)
from pipeline.data.sample import make_coco_sample, make_voc_sample
from pipeline.data.sample_scene import boundary_band, class_colour, rle_uncompressed, voc_label

# params.yaml `sample.download.sample`
DEFAULTS = {"seed": 0, "min_side": 120, "max_side": 240}
VOC_N = {"n_train": 40, "n_val": 16}
COCO_N = {"n_train": 40, "n_val": 8}
VOC_TAR = "VOCtrainval_11-May-2012.tar"
COCO_ZIPS = ("train2017.zip", "val2017.zip", "annotations_trainval2017.zip")
ROOT = "VOCdevkit/VOC2012/"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sample")
    voc = make_voc_sample(out / "voc" / VOC_TAR, **DEFAULTS, **VOC_N)
    coco = make_coco_sample(out / "coco", **DEFAULTS, **COCO_N)
    return {"dir": out, "voc": voc, "coco": coco}


@pytest.fixture(scope="module")
def voc_files(generated: dict) -> dict[str, bytes]:
    with tarfile.open(generated["dir"] / "voc" / VOC_TAR) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def coco_json(generated: dict) -> dict[str, dict]:
    with zipfile.ZipFile(generated["dir"] / "coco" / "annotations_trainval2017.zip") as zf:
        return {
            s: json.loads(zf.read(f"annotations/instances_{s}.json"))
            for s in ("train2017", "val2017")
        }


def _pattern(rel: str) -> tuple[str, str]:
    """(folder, suffix) of a path below VOC2012/: what must match between real and synthetic."""
    p = Path(rel)
    return str(p.parent), p.suffix


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64).reshape(-1, 3)
    return rgb / np.maximum(rgb.sum(1, keepdims=True), 1e-6)


CLASS_CHROMA = _chromaticity(np.stack([class_colour(c) for c in range(1, NUM_CLASSES)]) * 255)


def _nearest_class(rgb: np.ndarray) -> int:
    """Class whose colour has the closest chromaticity (shading and stripes cancel out)."""
    chroma = np.median(_chromaticity(rgb), axis=0)
    return int(np.argmin(((CLASS_CHROMA - chroma) ** 2).sum(1))) + 1


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64).reshape(-1, 3)
    mx, mn = rgb.max(1), rgb.min(1)
    return (mx - mn) / np.maximum(mx, 1)


# --- VOC ----------------------------------------------------------------------------------------


def test_voc_layout_matches_real_sample(voc_files: dict[str, bytes], voc_sample: Path) -> None:
    real = {_pattern(str(p.relative_to(voc_sample))) for p in voc_sample.rglob("*") if p.is_file()}
    assert all(n.startswith(ROOT) for n in voc_files)
    ours = {_pattern(n[len(ROOT) :]) for n in voc_files}
    assert ours == real
    real_lists = {p.name for p in (voc_sample / "ImageSets" / "Segmentation").glob("*.txt")}
    assert real_lists <= {"train.txt", "val.txt", "trainval.txt"}
    ours_lists = {Path(n).name for n in voc_files if n.endswith(".txt")}
    assert ours_lists == {"train.txt", "val.txt", "trainval.txt"}


def test_voc_lists_ids_and_files(voc_files: dict[str, bytes], voc_sample: Path) -> None:
    real_line = (voc_sample / "ImageSets/Segmentation/train.txt").read_text().splitlines()[0]
    id_re = re.compile(r"^(2007|2008|2009|2010|2011)_\d{6}$")
    assert id_re.match(real_line)
    lists = {
        s: voc_files[f"{ROOT}ImageSets/Segmentation/{s}.txt"].decode()
        for s in ("train", "val", "trainval")
    }
    ids = {s: t.splitlines() for s, t in lists.items()}
    for s, text in lists.items():
        assert text.endswith("\n") and "\r" not in text
        assert ids[s] == sorted(ids[s]) and all(id_re.match(i) for i in ids[s])
    assert len(ids["train"]) == VOC_N["n_train"] and len(ids["val"]) == VOC_N["n_val"]
    assert not set(ids["train"]) & set(ids["val"])
    assert ids["trainval"] == sorted(ids["train"] + ids["val"])
    jpgs = {Path(n).stem for n in voc_files if n.endswith(".jpg")}
    pngs = {Path(n).stem for n in voc_files if n.endswith(".png")}
    assert pngs == set(ids["trainval"])
    assert len(jpgs - pngs) == 2  # unlabelled images, as in the real tar


def test_voc_tar_metadata_is_fixed_and_safe(generated: dict, tmp_path: Path) -> None:
    with tarfile.open(generated["dir"] / "voc" / VOC_TAR) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {
            (0, 0, "", "", 1336694400)
        }
        assert any(m.isdir() and m.name == "VOCdevkit/VOC2012/JPEGImages" for m in members)
        tar.extractall(tmp_path, filter="data")  # the safe filter accepts every member
    assert (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").is_file()


def test_voc_labels_palette_values_sizes(voc_files: dict[str, bytes], voc_sample: Path) -> None:
    real_png = next((voc_sample / "SegmentationClass").glob("*.png"))
    real_palette = Image.open(real_png).getpalette()
    assert real_palette == voc_palette_flat()
    allowed = set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    sizes = set()
    for name, data in voc_files.items():
        if not name.endswith(".png"):
            continue
        lab = Image.open(io.BytesIO(data))
        img = Image.open(
            io.BytesIO(voc_files[name.replace("SegmentationClass", "JPEGImages")[:-3] + "jpg"])
        )
        assert lab.format == "PNG" and lab.mode == "P", name
        assert lab.getpalette() == real_palette, name
        assert img.format == "JPEG" and img.mode == "RGB", name
        assert lab.size == img.size, name
        values = set(np.unique(np.asarray(lab)).tolist())
        assert values <= allowed and IGNORE_INDEX in values and 0 in values, (name, values)
        assert min(img.size) >= 120 and max(img.size) <= 240
        sizes.update(img.size)
    assert any(s % 2 for s in sizes)  # odd sizes occur


def test_voc_labels_are_what_was_drawn(voc_files: dict[str, bytes]) -> None:
    """Every labelled object shows its class colour; background pixels are muted."""
    checked = 0
    for name, data in voc_files.items():
        if not name.endswith(".png"):
            continue
        lab = np.asarray(Image.open(io.BytesIO(data)))
        jpg = voc_files[name.replace("SegmentationClass", "JPEGImages")[:-3] + "jpg"]
        img = np.asarray(Image.open(io.BytesIO(jpg)))
        for c in set(np.unique(lab).tolist()) - {0, IGNORE_INDEX}:
            assert _nearest_class(img[lab == c]) == c, (name, c)
            checked += 1
        fg = (lab > 0) & (lab < IGNORE_INDEX)
        assert np.mean(_saturation(img[fg]) > 0.4) > 0.95, name
        assert np.mean(_saturation(img[lab == 0]) < 0.4) > 0.97, name
    assert checked >= VOC_N["n_train"] + VOC_N["n_val"]


def test_voc_all_classes_in_train(generated: dict, voc_files: dict[str, bytes]) -> None:
    train = voc_files[f"{ROOT}ImageSets/Segmentation/train.txt"].decode().split()
    seen = set()
    for i in train:
        seen |= set(
            np.unique(
                np.asarray(Image.open(io.BytesIO(voc_files[f"{ROOT}SegmentationClass/{i}.png"])))
            ).tolist()
        )
    assert seen - {0, IGNORE_INDEX} == set(range(1, NUM_CLASSES))
    assert generated["voc"]["classes"]["train"] == list(range(1, NUM_CLASSES))


def test_boundary_band_is_four_pixels_wide() -> None:
    inst = np.zeros((40, 40), np.int32)
    inst[10:30, 10:30] = 1
    sem = (inst * 7).astype(np.uint8)
    label = voc_label(sem, inst)
    row = label[20]
    assert row[:8].tolist() == [0] * 8 and row[12:28].tolist() == [7] * 16
    assert row[8:12].tolist() == [IGNORE_INDEX] * 4  # 2 px outside + 2 px inside the edge
    assert not boundary_band(np.zeros((5, 5), np.int32)).any()  # image borders are not outlines


# --- COCO ---------------------------------------------------------------------------------------


def test_coco_zip_layout_matches_real_sample(generated: dict, coco_sample: Path) -> None:
    real_names = [p.name for p in (coco_sample / "images" / "val2017").glob("*.jpg")]
    name_re = re.compile(r"^\d{12}\.jpg$")
    assert real_names and all(name_re.match(n) for n in real_names)
    for split in ("train2017", "val2017"):
        with zipfile.ZipFile(generated["dir"] / "coco" / f"{split}.zip") as zf:
            names = zf.namelist()
        assert names[0] == f"{split}/"
        assert all(
            n.startswith(f"{split}/") and name_re.match(n.split("/", 1)[1]) for n in names[1:]
        )
    with zipfile.ZipFile(generated["dir"] / "coco" / "annotations_trainval2017.zip") as zf:
        assert set(zf.namelist()) == {
            "annotations/",
            "annotations/instances_train2017.json",
            "annotations/instances_val2017.json",
        }


def test_coco_json_schema_matches_real(coco_json: dict[str, dict], coco_sample: Path) -> None:
    real = json.loads((coco_sample / "annotations" / "instances_val2017.json").read_text())
    for s, d in coco_json.items():
        assert set(real) - {"type"} <= set(d), s  # `type` is an oddity of the 2014 files
        assert d["categories"] == real["categories"] == list(COCO_CATEGORIES)
        assert {"id", "file_name", "width", "height"} <= set(d["images"][0])
        assert set(d["annotations"][0]) == set(real["annotations"][0])
    assert len(coco_json["train2017"]["images"]) == COCO_N["n_train"]
    assert len(coco_json["val2017"]["images"]) == COCO_N["n_val"]
    ids = [i["id"] for d in coco_json.values() for i in d["images"]]
    ann_ids = [a["id"] for d in coco_json.values() for a in d["annotations"]]
    assert len(set(ids)) == len(ids) and len(set(ann_ids)) == len(ann_ids)


def test_coco_annotations_load_and_rasterise(
    generated: dict, coco_json: dict[str, dict], tmp_path: Path
) -> None:
    for s, d in coco_json.items():
        path = tmp_path / f"{s}.json"
        path.write_text(json.dumps(d))
        coco = COCO(str(path))
        with zipfile.ZipFile(generated["dir"] / "coco" / f"{s}.zip") as zf:
            assert sorted(n for n in zf.namelist() if n.endswith(".jpg")) == sorted(
                f"{s}/{i['file_name']}" for i in d["images"]
            )
            for info in d["images"]:
                assert Image.open(io.BytesIO(zf.read(f"{s}/{info['file_name']}"))).size == (
                    info["width"],
                    info["height"],
                )
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=None)):
            info = coco.imgs[ann["image_id"]]
            m = coco.annToMask(ann)
            assert m.shape == (info["height"], info["width"])
            assert 0 < m.sum() == ann["area"]
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]


def test_coco_has_crowds_polygons_non_voc_and_empty(coco_json: dict[str, dict]) -> None:
    for s, d in coco_json.items():
        anns = d["annotations"]
        crowd = [a for a in anns if a["iscrowd"]]
        poly = [a for a in anns if not a["iscrowd"]]
        assert crowd and poly, s
        for a in crowd:
            seg = a["segmentation"]
            info = next(i for i in d["images"] if i["id"] == a["image_id"])
            assert isinstance(seg["counts"], list) and seg["size"] == [
                info["height"],
                info["width"],
            ]
            assert sum(seg["counts"]) == info["height"] * info["width"]
        for a in poly:
            assert isinstance(a["segmentation"], list)
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        assert any(a["category_id"] not in COCO_TO_VOC for a in anns), s
        annotated = {a["image_id"] for a in anns}
        assert any(i["id"] not in annotated for i in d["images"]), s
    train = coco_json["train2017"]["annotations"]
    assert any(len(a["segmentation"]) == 2 for a in train if not a["iscrowd"])
    assert {COCO_TO_VOC[a["category_id"]] for a in train if a["category_id"] in COCO_TO_VOC} == set(
        range(1, NUM_CLASSES)
    )
    by_image: dict[int, list[np.ndarray]] = {}
    for a in train:
        by_image.setdefault(a["image_id"], []).append(a)
    assert any(len(v) > 1 for v in by_image.values())  # several instances per image


def test_coco_grayscale_and_cmyk_jpegs(generated: dict) -> None:
    modes = []
    for split in ("train2017", "val2017"):
        with zipfile.ZipFile(generated["dir"] / "coco" / f"{split}.zip") as zf:
            for n in zf.namelist():
                if n.endswith(".jpg"):
                    im = Image.open(io.BytesIO(zf.read(n)))
                    assert im.format == "JPEG"
                    modes.append(im.mode)
                    assert im.convert("RGB").mode == "RGB"
    assert modes.count("L") >= 1 and modes.count("CMYK") >= 1
    assert generated["coco"]["train2017"]["grayscale"] == 1
    assert generated["coco"]["train2017"]["cmyk"] == 1


def test_coco_masks_are_what_was_drawn(generated: dict, coco_json: dict[str, dict]) -> None:
    """Painting crowds first, then the others largest first, shows each VOC class's colour."""
    d = coco_json["train2017"]
    checked = 0
    with zipfile.ZipFile(generated["dir"] / "coco" / "train2017.zip") as zf:
        for info in d["images"]:
            im = Image.open(io.BytesIO(zf.read(f"train2017/{info['file_name']}")))
            if im.mode != "RGB":
                continue
            img = np.asarray(im)
            h, w = img.shape[:2]
            anns = [a for a in d["annotations"] if a["image_id"] == info["id"]]
            anns.sort(key=lambda a: (not a["iscrowd"], -a["area"]))
            sem = np.zeros((h, w), np.int32)
            for a in anns:
                seg = a["segmentation"]
                rle = mask_utils.frPyObjects(seg, h, w)
                m = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle)
                sem[m.astype(bool)] = COCO_TO_VOC.get(a["category_id"], 0)
            # away from edges (JPEG chroma blur), each VOC class region has its class's colour
            inner = ~boundary_band(sem)
            for c in set(np.unique(sem).tolist()) - {0}:
                region = (sem == c) & inner
                if region.sum() >= 20:
                    assert _nearest_class(img[region]) == c, (info["file_name"], c)
                    checked += 1
    assert checked >= 30


# --- helpers, determinism, errors ---------------------------------------------------------------


def test_rle_uncompressed_round_trips() -> None:
    rng = np.random.default_rng(1)
    for first in (0, 1):
        m = rng.random((17, 23)) < 0.4
        m[0, 0] = bool(first)
        rle = rle_uncompressed(m)
        assert rle["size"] == [17, 23] and (rle["counts"][0] == 0) == bool(first)
        back = mask_utils.decode(mask_utils.frPyObjects(rle, 17, 23))
        assert np.array_equal(back.astype(bool), m)


def test_same_seed_same_bytes_other_seed_differs(generated: dict, tmp_path: Path) -> None:
    small = {"min_side": 64, "max_side": 96}
    for out, seed in ((tmp_path / "a", 3), (tmp_path / "b", 3), (tmp_path / "c", 4)):
        make_voc_sample(out / VOC_TAR, seed=seed, n_train=6, n_val=2, **small)
        make_coco_sample(out, seed=seed, n_train=4, n_val=2, **small)
    for name in (VOC_TAR, *COCO_ZIPS):
        a, b, c = ((tmp_path / x / name).read_bytes() for x in "abc")
        assert a == b, name
        assert a != c, name
    assert not list(tmp_path.glob("*/.*.tmp"))  # no leftovers of the atomic writes


def test_default_run_is_reproducible(generated: dict, tmp_path: Path) -> None:
    make_voc_sample(tmp_path / VOC_TAR, **DEFAULTS, **VOC_N)
    assert (tmp_path / VOC_TAR).read_bytes() == (generated["dir"] / "voc" / VOC_TAR).read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"n_val": -1}, "n_val must be an integer >= 1"),
        ({"min_side": 200, "max_side": 100}, "33 <= min_side <= max_side"),
        ({"min_side": 10}, "33 <= min_side <= max_side"),
    ],
)
def test_bad_arguments_name_the_output(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"seed": 0, "n_train": 2, "n_val": 1, "min_side": 64, "max_side": 96, **kwargs}
    target = tmp_path / "voc" / VOC_TAR
    with pytest.raises(ValueError, match=message) as err:
        make_voc_sample(target, **args)
    assert str(target) in str(err.value)
    assert not target.exists() and not (tmp_path / "voc").exists()


def test_coco_allows_empty_split(tmp_path: Path) -> None:
    s = make_coco_sample(tmp_path, seed=0, n_train=3, n_val=0, min_side=64, max_side=80)
    assert s["val2017"]["images"] == 0
    with zipfile.ZipFile(tmp_path / "annotations_trainval2017.zip") as zf:
        assert json.loads(zf.read("annotations/instances_val2017.json"))["images"] == []


def test_cli_help() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.data.sample", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--voc-train" in r.stdout and "byte-identical" in r.stdout


def test_class_colours_are_distinct_and_saturated() -> None:
    cols = [class_colour(c) for c in range(1, NUM_CLASSES)]
    hues = [colorsys.rgb_to_hsv(*c)[0] * 360 for c in cols]
    for i in range(len(hues)):
        for j in range(i):
            d = abs(hues[i] - hues[j]) % 360
            assert min(d, 360 - d) >= 17.9
    assert min(colorsys.rgb_to_hsv(*c)[1] for c in cols) >= 0.85
