"""coco_to_voc: rules, validation, errors and the whole split on the real COCO val2017 sample.

Every label map is compared pixel for pixel with a reference built here independently: one
pycocotools `COCO().annToMask` per annotation, painted with boolean indexing.
"""

from __future__ import annotations

import copy
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
from pycocotools.coco import COCO

from pipeline.classes import COCO_TO_VOC
from pipeline.data import coco_annotations as ca
from pipeline.data import coco_json as cj
from pipeline.data import coco_paint as cp
from pipeline.data import coco_voc as cv
from pipeline.data.shards import ShardReader
from tests.repo_utils import write_tiny_params

SPLIT = "val2017"
MEMBER = f"annotations/instances_{SPLIT}.json"


# --- helpers -----------------------------------------------------------------------------------


def make_zips(
    tmp: Path,
    instances: dict | bytes,
    images_dir: Path,
    split: str = SPLIT,
    skip: set[str] = frozenset(),
) -> tuple[Path, Path]:
    """COCO-layout archives: annotations zip with one instances member, images zip `<split>/*`."""
    tmp.mkdir(parents=True, exist_ok=True)
    ann_zip, img_zip = tmp / "annotations_trainval2017.zip", tmp / f"{split}.zip"
    data = instances if isinstance(instances, bytes) else json.dumps(instances).encode()
    members = {}
    if ann_zip.exists():  # keep the other split's member
        with zipfile.ZipFile(ann_zip) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
    members[f"annotations/instances_{split}.json"] = data
    with zipfile.ZipFile(ann_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with zipfile.ZipFile(img_zip, "w") as zf:
        for f in sorted(images_dir.iterdir()):
            if f.name not in skip:
                zf.write(f, f"{split}/{f.name}")
    return ann_zip, img_zip


def reference_label_map(coco: COCO, image_id: int) -> np.ndarray:
    """The rules, written the slow obvious way: one annToMask per annotation."""
    img = coco.imgs[image_id]
    h, w = img["height"], img["width"]
    per_class: dict[int, np.ndarray] = {}
    crowd = np.zeros((h, w), bool)
    for ann in coco.imgToAnns.get(image_id, []):
        voc = COCO_TO_VOC.get(ann["category_id"])
        if voc is None:
            continue
        m = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"]:
            crowd |= m
        else:
            per_class.setdefault(voc, np.zeros((h, w), bool))
            per_class[voc] |= m
    label = np.zeros((h, w), np.uint8)
    n_classes = np.zeros((h, w), np.int32)
    for voc, m in per_class.items():
        label[m] = voc
        n_classes += m
    label[n_classes >= 2] = 255
    label[crowd] = 255
    return label


def coco_from_dict(d: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(d)
    coco.createIndex()
    return coco


def read_labels(out: Path) -> dict[str, tuple[dict, np.ndarray, bytes]]:
    r = ShardReader(out)
    res = {}
    for i in range(len(r)):
        png = r.blob(i, "label")
        res[r.records[i]["key"]] = (r.meta(i), cp.label_png_to_array(png), png)
    r.close()
    return res


@pytest.fixture(scope="module")
def instances(coco_sample: Path) -> dict:
    return json.loads((coco_sample / "annotations" / "instances_val2017.json").read_text())


@pytest.fixture(scope="module")
def images_dir(coco_sample: Path) -> Path:
    return coco_sample / "images" / "val2017"


@pytest.fixture(scope="module")
def reference(instances: dict) -> dict[int, np.ndarray]:
    coco = coco_from_dict(instances)
    return {img["id"]: reference_label_map(coco, img["id"]) for img in instances["images"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, instances, images_dir) -> tuple[dict, Path]:
    """The real sample through convert_split with 2 workers and min_pixels 0."""
    tmp = tmp_path_factory.mktemp("coco_full")
    ann_zip, img_zip = make_zips(tmp, instances, images_dir)
    out = tmp / "out" / SPLIT
    report = cv.convert_split(
        ann_zip, img_zip, SPLIT, out, min_pixels=0, workers=2, shard_size=10, progress=False
    )
    return report, out


# --- the whole split on the real sample --------------------------------------------------------


def test_every_label_map_equals_the_annToMask_reference(converted, instances, reference):
    report, out = converted
    labels = read_labels(out)
    assert report["images_total"] == report["images_kept"] == len(instances["images"]) == 32
    assert set(labels) == {Path(img["file_name"]).stem for img in instances["images"]}
    seen = set()
    for img in instances["images"]:
        meta, label, _png = labels[Path(img["file_name"]).stem]
        assert meta == {
            "image_id": img["id"],
            "file_name": img["file_name"],
            "width": img["width"],
            "height": img["height"],
            "split": SPLIT,
        }
        np.testing.assert_array_equal(label, reference[img["id"]], err_msg=img["file_name"])
        seen |= set(np.unique(label).tolist())
    # the sample exercises background, many classes, overlaps/crowds (255)
    assert {0, 15, 255} <= seen and len(seen) >= 10
    assert report["annotations_total"] == len(instances["annotations"]) == 288
    assert report["annotations_skipped"] == 0
    vocs = sum(1 for a in instances["annotations"] if a["category_id"] in COCO_TO_VOC)
    assert report["annotations_used_voc"] == vocs
    assert report["annotations_non_voc"] == 288 - vocs


def test_output_is_sharded_not_one_file_per_image(converted):
    _report, out = converted
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "index.json",
        "shard-00000.bin",
        "shard-00001.bin",
        "shard-00002.bin",
        "shard-00003.bin",
    ]
    reader = ShardReader(out)
    assert reader.extra["classes"][15] == "person" and reader.extra["ignore_index"] == 255
    with Image.open(io.BytesIO(reader.blob(0, "label"))) as im:
        assert im.format == "PNG" and im.mode == "L"


def test_min_pixels_drop_and_worker_count_independence(
    tmp_path, converted, instances, images_dir, reference
):
    _report, out_all = converted
    ann_zip, img_zip = make_zips(tmp_path, instances, images_dir)
    min_pixels = 20000
    report = cv.convert_split(
        ann_zip,
        img_zip,
        SPLIT,
        tmp_path / "out",
        min_pixels=min_pixels,
        workers=1,
        shard_size=10,
        progress=False,
    )
    voc_pixels = {iid: int(((lab > 0) & (lab < 255)).sum()) for iid, lab in reference.items()}
    expect_dropped = sorted(iid for iid, n in voc_pixels.items() if n < min_pixels)
    assert 0 < len(expect_dropped) < 32  # the threshold splits the sample
    dropped = report["images_dropped"][cv.DROP_FEW_PIXELS]
    assert sorted(dropped["ids"]) == expect_dropped and dropped["count"] == len(expect_dropped)
    assert report["images_kept"] == 32 - len(expect_dropped)
    assert report["voc_pixels_kept"] == sum(n for n in voc_pixels.values() if n >= min_pixels)
    # workers=1 here, workers=2 in `converted`: identical PNG bytes for every kept image
    all_labels, kept = read_labels(out_all), read_labels(tmp_path / "out")
    assert set(kept) == {
        k for k, (m, _l, _p) in all_labels.items() if m["image_id"] not in expect_dropped
    }
    for key, (_meta, _label, png) in kept.items():
        assert png == all_labels[key][2]


# --- malformed annotations: skipped, counted with their ids, never a crash ----------------------


def _inject_malformed(instances: dict) -> tuple[dict, dict[str, list[int]], dict]:
    d = copy.deepcopy(instances)
    img = next(i for i in d["images"] if i["id"] == 397133)
    h, w = img["height"], img["width"]
    base = {
        "image_id": 397133,
        "category_id": 1,
        "iscrowd": 0,
        "area": 100.0,
        "bbox": [0, 0, 10, 10],
    }
    square = [100.0, 100.0, 200.0, 100.0, 200.0, 200.0, 100.0, 200.0]
    bad_rle = {"size": [h, w], "counts": [10, 20, 30]}  # runs do not add up to h*w
    m = np.zeros((h, w), np.uint8, order="F")
    m[300:380, 20:90] = 1
    good_rle = mask_utils.encode(np.asfortranarray(m))
    good_rle["counts"] = good_rle["counts"].decode("ascii")
    cases = [
        (9000001, {"segmentation": [[10.0, 10.0, 50.0, 50.0]]}, ca.SKIP_SHORT_POLYGON),
        (9000002, {}, ca.SKIP_NO_SEGMENTATION),  # bbox only
        (9000003, {"segmentation": []}, ca.SKIP_NO_SEGMENTATION),
        (9000004, {"segmentation": [square], "category_id": 999}, ca.SKIP_UNKNOWN_CATEGORY),
        (9000005, {"segmentation": [square], "image_id": 123456789}, ca.SKIP_UNKNOWN_IMAGE),
        (9000006, {"segmentation": [[1e9, 0.0, 2e9, 0.0, 2e9, 1e9]]}, ca.SKIP_OFF_IMAGE),
        (9000007, {"segmentation": bad_rle, "iscrowd": 1}, ca.SKIP_BAD_SEGMENTATION),
        (9000008, {"segmentation": [square], "category_id": None}, ca.SKIP_MALFORMED),
        (9000009, {"segmentation": {"size": [10, 10], "counts": [100]}}, ca.SKIP_BAD_SEGMENTATION),
        (9000010, {"segmentation": [square[:7]]}, ca.SKIP_BAD_SEGMENTATION),  # odd count
        (9000011, {"segmentation": [[float("nan")] * 6]}, ca.SKIP_BAD_SEGMENTATION),
        (
            9000012,
            {"segmentation": {"size": [h, w], "counts": "not an rle"}},
            ca.SKIP_BAD_SEGMENTATION,
        ),
        (9000013, {"segmentation": [square], "iscrowd": "yes"}, ca.SKIP_MALFORMED),
    ]
    expected: dict[str, list[int]] = {}
    for ann_id, fields, reason in cases:
        ann = {**base, "id": ann_id, **fields}
        d["annotations"].append(ann)
        expected.setdefault(reason, []).append(ann_id)
    # a valid compressed-RLE dog: used, not skipped
    valid = {**base, "id": 9000100, "category_id": 18, "segmentation": good_rle}
    d["annotations"].append(valid)
    return d, expected, valid


def test_malformed_annotations_are_counted_with_ids(tmp_path, instances, images_dir):
    """Unusable annotations are skipped and counted; VOC-class objects (all person here) whose
    segmentation is unusable are counted too, and their bbox is marked ignore."""
    d, expected, valid = _inject_malformed(instances)
    voc_ids = {a["id"] for a in d["annotations"] if a.get("category_id") in COCO_TO_VOC}
    ignored = {
        r: [i for i in ids if i in voc_ids]
        for r, ids in expected.items()
        if r in ca.SEGMENTATION_REASONS
    }
    expected = {
        r: [i for i in ids if r not in ignored or i not in voc_ids] for r, ids in expected.items()
    }
    assert sum(map(len, ignored.values())) == 9
    missing_img = next(i for i in d["images"] if i["id"] == 37777)
    missing_ids = [a["id"] for a in d["annotations"] if a["image_id"] == 37777]
    assert missing_ids
    expected[ca.SKIP_IMAGE_MISSING] = missing_ids
    ann_zip, img_zip = make_zips(tmp_path, d, images_dir, skip={missing_img["file_name"]})
    out = tmp_path / "out"
    report = cv.convert_split(
        ann_zip, img_zip, SPLIT, out, min_pixels=0, workers=2, shard_size=8, progress=False
    )

    skipped = report["annotations_skipped_by_reason"]
    assert set(skipped) == set(ca.SKIP_REASONS)
    for reason in ca.SKIP_REASONS:
        want = sorted(expected.get(reason, []))
        assert sorted(skipped[reason]["ids"]) == want, reason
        assert skipped[reason]["count"] == len(want) and not skipped[reason]["ids_truncated"]
    assert report["annotations_skipped"] == sum(len(v) for v in expected.values())
    marked = report["voc_objects_marked_ignore_by_reason"]
    for reason in ca.SEGMENTATION_REASONS:
        assert sorted(marked[reason]["ids"]) == sorted(ignored.get(reason, [])), reason
    assert report["annotations_voc_marked_ignore"] == 9
    assert report["annotations_total"] == len(d["annotations"])
    assert report["images_dropped"][cv.DROP_MISSING_FILE] == {
        "count": 1,
        "ids": [37777],
        "ids_truncated": False,
    }
    assert report["images_kept"] == 31, report["images_dropped"]
    # json round trip: the report is plain JSON
    json.dumps(report, allow_nan=False)

    # the remaining maps equal the reference over the valid annotations (incl. the RLE dog)
    clean = copy.deepcopy(instances)
    clean["annotations"].append(valid)
    coco = coco_from_dict(clean)
    labels = read_labels(out)
    assert Path(missing_img["file_name"]).stem not in labels
    for _key, (meta, label, _png) in labels.items():
        want = reference_label_map(coco, meta["image_id"])
        if meta["image_id"] == 397133:
            want[0:10, 0:10] = 255  # the bbox [0, 0, 10, 10] of the unusable persons
        np.testing.assert_array_equal(label, want)
    assert (labels["000000397133"][1] == 12).any()  # the dog is painted


def test_id_lists_are_capped_but_counts_complete():
    r = cv._Reasons(ca.SKIP_REASONS)
    for i in range(cv.ID_LIST_CAP + 5):
        r.add(ca.SKIP_NO_SEGMENTATION, i)
    rep = r.report()[ca.SKIP_NO_SEGMENTATION]
    assert rep["count"] == cv.ID_LIST_CAP + 5
    assert rep["ids"] == list(range(cv.ID_LIST_CAP)) and rep["ids_truncated"]


def test_validate_annotation_reasons():
    sizes, cats = {1: (50, 60)}, {1, 25}
    sq = [5.0, 5.0, 20.0, 5.0, 20.0, 20.0]
    ok = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [sq]}
    assert ca.validate_annotation(ok, sizes, cats) is None
    assert ca.validate_annotation({**ok, "category_id": 25}, sizes, cats) is None  # non-VOC is fine
    full = {"size": [50, 60], "counts": [3000]}
    assert ca.validate_annotation({**ok, "iscrowd": 1, "segmentation": full}, sizes, cats) is None
    cases = {
        ca.SKIP_MALFORMED: ["not a dict", {**ok, "image_id": "1"}, {**ok, "iscrowd": 2}],
        ca.SKIP_UNKNOWN_IMAGE: [{**ok, "image_id": 2}],
        ca.SKIP_UNKNOWN_CATEGORY: [{**ok, "category_id": 3}],
        ca.SKIP_NO_SEGMENTATION: [{**ok, "segmentation": None}, {**ok, "segmentation": {}}],
        ca.SKIP_SHORT_POLYGON: [{**ok, "segmentation": [sq[:4], sq[:2]]}],
        ca.SKIP_OFF_IMAGE: [{**ok, "segmentation": [[x + 60 for x in sq]]}],
        ca.SKIP_BAD_SEGMENTATION: [
            {**ok, "segmentation": "polygon"},
            {**ok, "segmentation": [["a", "b", "c", "d", "e", "f"]]},
            {**ok, "segmentation": {"size": [50, 60], "counts": [2999]}},
            {**ok, "segmentation": {"size": [50, 60], "counts": [-1, 3001]}},
            {**ok, "segmentation": {"size": [60, 50], "counts": [3000]}},
        ],
    }
    for reason, anns in cases.items():
        for ann in anns:
            assert ca.validate_annotation(ann, sizes, cats) == reason, ann
    assert ca.validate_annotation(ok, sizes, cats, missing_images={1}) == ca.SKIP_IMAGE_MISSING
    # one usable part is enough; a missing iscrowd is 0 (pycocotools)
    assert ca.validate_annotation({**ok, "segmentation": [sq, sq[:4]]}, sizes, cats) is None
    no_crowd = {k: v for k, v in ok.items() if k != "iscrowd"}
    assert ca.validate_annotation(no_crowd, sizes, cats) is None


# --- rasterization and the rules ---------------------------------------------------------------


def test_rasterize_annotation_polygon_and_both_rle_forms(instances):
    coco = coco_from_dict(instances)
    poly = next(a for a in instances["annotations"] if not a["iscrowd"])
    crowd = next(a for a in instances["annotations"] if a["iscrowd"])
    assert isinstance(crowd["segmentation"]["counts"], list)  # uncompressed RLE in the sample
    for ann in (poly, crowd):
        img = coco.imgs[ann["image_id"]]
        got = cp.rasterize_annotation(ann, img["height"], img["width"])
        assert got.dtype == bool and got.shape == (img["height"], img["width"])
        np.testing.assert_array_equal(got, coco.annToMask(ann).astype(bool))
    # compressed RLE (string counts) of the crowd mask decodes to the same pixels
    img = coco.imgs[crowd["image_id"]]
    m = coco.annToMask(crowd)
    rle = mask_utils.encode(np.asfortranarray(m))
    compressed = {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}
    np.testing.assert_array_equal(
        cp.rasterize_annotation(compressed, img["height"], img["width"]), m.astype(bool)
    )
    with pytest.raises(ValueError, match="polygon_under_3_points"):
        cp.rasterize_annotation({"id": 5, "segmentation": [[1, 1, 2, 2]]}, 10, 10)


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 13), (120, 90)):
        m = np.asfortranarray((rng.random((h, w)) < 0.3).astype(np.uint8))
        m[: h // 2, : w // 3] = 1  # long runs too
        s = mask_utils.encode(m)["counts"]
        runs = ca._rle_string_counts(s)
        flat = m.ravel(order="F")
        expect, v, n = [], 0, 0
        for x in flat:
            if x != v:
                expect.append(n)
                v, n = x, 0
            n += 1
        expect.append(n)
        assert runs == expect and sum(runs) == h * w


def test_apply_voc_rules():
    a = np.array([[1, 1, 0, 0]], np.uint8)
    b = np.array([[0, 1, 1, 0]], np.uint8)
    crowd = np.array([[0, 0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(cp.apply_voc_rules([(15, a)], None), [[15, 15, 0, 0]])
    np.testing.assert_array_equal(cp.apply_voc_rules([(15, a), (12, b)], None), [[15, 255, 12, 0]])
    np.testing.assert_array_equal(
        cp.apply_voc_rules([(15, a), (12, b)], crowd), [[15, 255, 12, 255]]
    )
    np.testing.assert_array_equal(cp.apply_voc_rules([], crowd), [[0, 0, 0, 255]])
    # class sums wrap in uint8 (20+19+...); every multiply-covered pixel still ends up 255
    many = [(c, np.ones((1, 4), np.uint8)) for c in range(1, 21)]
    np.testing.assert_array_equal(cp.apply_voc_rules(many, None), [[255] * 4])
    assert cp.voc_pixel_count(np.array([[0, 1, 20, 255, 7]], np.uint8)) == 3
    assert cp.keep_image(1000, 1000) and not cp.keep_image(999, 1000) and cp.keep_image(0, 0)


def test_voc_label_map_rules_on_rectangles():
    def rect(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    def ann(cat, seg, crowd=0):
        return {"category_id": cat, "iscrowd": crowd, "segmentation": seg}

    h, w = 60, 80
    anns = [
        ann(1, rect(0, 0, 30, 30)),  # person
        ann(1, rect(20, 0, 40, 10)),  # another person overlapping the first: still person
        ann(18, rect(25, 20, 50, 40)),  # dog overlapping the person -> 255 in the overlap
        ann(25, rect(0, 40, 20, 60)),  # giraffe: not a VOC class -> background
        ann(25, rect(60, 0, 80, 20), crowd=1),  # non-VOC crowd: ignored, not 255
        ann(72, rect(55, 40, 75, 55)),  # tv
        ann(1, rect(65, 45, 80, 60), crowd=1),  # person crowd over the tv -> 255
    ]
    label = cp.voc_label_map(anns, h, w)
    assert label.shape == (h, w) and label.dtype == np.uint8 and label.flags.c_contiguous
    assert label[5, 5] == 15 and label[5, 35] == 15  # both persons
    assert label[25, 27] == 255  # person/dog overlap
    assert label[35, 45] == 12  # dog alone
    assert label[50, 10] == 0 and label[10, 70] == 0  # giraffe, giraffe crowd
    assert label[42, 58] == 20  # tv
    assert label[50, 70] == 255 and label[58, 78] == 255  # person crowd (over tv and alone)
    coco = coco_from_dict(
        {
            "images": [{"id": 1, "height": h, "width": w, "file_name": "x.jpg"}],
            "annotations": [{**a, "id": i + 1, "image_id": 1} for i, a in enumerate(anns)],
            "categories": [{"id": c} for c in (1, 18, 25, 72)],
        }
    )
    np.testing.assert_array_equal(label, reference_label_map(coco, 1))
    assert set(np.unique(cp.voc_label_map([], h, w)).tolist()) == {0}


def test_encode_label_png_round_trip():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 1, 15, 20, 255], np.uint8), size=(37, 53))
    for arr in (label, np.asfortranarray(label), label.T.copy().T):
        png = cp.encode_label_png(arr)
        assert png == cp.encode_label_png(label)  # deterministic, layout-independent
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "L" and im.size == (53, 37)
            np.testing.assert_array_equal(np.asarray(im), label)
    with pytest.raises(ValueError, match="uint8"):
        cp.encode_label_png(label.astype(np.int32))


# --- files that are not usable: clear errors naming file/member and key -------------------------


def test_load_instances_errors():
    src = "ann.zip:annotations/instances_val2017.json"
    with pytest.raises(
        cj.CocoFormatError, match=r"ann\.zip:annotations/instances_val2017\.json: not valid JSON"
    ):
        cj.load_instances(b"{not json", src)
    with pytest.raises(cj.CocoFormatError, match="not UTF-8"):
        cj.load_instances(b"\xff\xfe\x00", src)
    with pytest.raises(cj.CocoFormatError, match="got a JSON list"):
        cj.load_instances(b"[]", src)
    for key in cj.REQUIRED_KEYS:
        d = {k: [] for k in cj.REQUIRED_KEYS if k != key}
        with pytest.raises(cj.CocoFormatError, match=rf"{src}: missing required key '{key}'"):
            cj.load_instances(json.dumps(d).encode(), src)
    with pytest.raises(cj.CocoFormatError, match="'images' must be a list"):
        cj.load_instances(b'{"images": {}, "annotations": [], "categories": []}', src)
    assert cj.load_instances(
        io.BytesIO(b'{"images": [], "annotations": [], "categories": []}'), src
    )


def test_streaming_parse_equals_json_loads_and_reports_errors(coco_sample):
    raw = (coco_sample / "annotations" / "instances_val2017.json").read_bytes()
    seen = []

    def hook(ann, i):
        seen.append(i)
        return ann

    assert cj.load_instances(raw, "x", annotation_hook=hook) == json.loads(raw)
    assert seen == list(range(288))
    compact = cj.load_instances(raw, "x", annotation_hook=ca.compact_annotation)["annotations"]
    assert [r[0] for r in compact] == [a["id"] for a in json.loads(raw)["annotations"]]
    ok = '{"images": [], "categories": [], "annotations": [{"id": 1}, {"id": 2}]}'
    assert cj.load_instances(f" \n{ok}\n ".encode(), "x", annotation_hook=hook)["annotations"] == [
        {"id": 1},
        {"id": 2},
    ]
    bad = {
        '{"images": [], "annotations": [{"id": 1}, ': "Expecting value",
        '{"images": [] "annotations": []}': "Expecting ',' delimiter",
        '{"images": [], "annotations": [1 2], "categories": []}': "Expecting ',' delimiter",
        '{"images": [], "annotations": [], "categories": []} x': "Extra data",
        "{1: []}": "Expecting property name",
        '{"annotations" []}': "Expecting ':' delimiter",
    }
    for text, msg in bad.items():
        for h in (None, hook):
            with pytest.raises(cj.CocoFormatError, match=rf"^src\.json: not valid JSON \({msg}"):
                cj.load_instances(text.encode(), "src.json", annotation_hook=h)


def test_convert_split_errors_name_the_file_and_write_nothing(tmp_path, instances, images_dir):
    out = tmp_path / "out"
    kw = {"min_pixels": 0, "workers": 1, "shard_size": 10, "progress": False}
    ann_zip, img_zip = make_zips(tmp_path / "a", b'{"images": [], "annotations": []', images_dir)
    with pytest.raises(
        cj.CocoFormatError, match=rf"annotations_trainval2017\.zip:{MEMBER}: not valid JSON"
    ):
        cv.convert_split(ann_zip, img_zip, SPLIT, out, **kw)
    d = {k: v for k, v in instances.items() if k != "categories"}
    ann_zip, img_zip = make_zips(tmp_path / "b", d, images_dir)
    with pytest.raises(cj.CocoFormatError, match=rf"{MEMBER}: missing required key 'categories'"):
        cv.convert_split(ann_zip, img_zip, SPLIT, out, **kw)
    with pytest.raises(
        cj.CocoFormatError, match=r"no member 'annotations/instances_train2017\.json'"
    ):
        cv.convert_split(ann_zip, img_zip, "train2017", out, **kw)
    bad = copy.deepcopy(instances)
    del bad["images"][3]["height"]
    ann_zip, img_zip = make_zips(tmp_path / "c", bad, images_dir)
    with pytest.raises(cj.CocoFormatError, match=r"images\[3\]: missing required key 'height'"):
        cv.convert_split(ann_zip, img_zip, SPLIT, out, **kw)
    notzip = tmp_path / "not.zip"
    notzip.write_bytes(b"plain text")
    with pytest.raises(cj.CocoFormatError, match=r"not\.zip: not a readable zip"):
        cv.convert_split(notzip, img_zip, SPLIT, out, **kw)
    with pytest.raises(cj.CocoFormatError, match=r"not\.zip: not a readable zip"):
        cv.convert_split(ann_zip, notzip, SPLIT, out, **kw)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# --- the DVC stage entry point -------------------------------------------------------------------


def _stage(repo_root: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    cmd = [sys.executable, "-m", "stages.coco_to_voc", "--params", str(tmp / "params.yaml"), *args]
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_stage_writes_both_splits_and_report_atomically(tmp_path, repo_root, instances, images_dir):
    coco_to_voc = {
        "splits": ["train2017", "val2017"],
        "min_pixels": 200,
        "workers": 2,
        "shard_size": 16,
        "max_rejected_fraction": 0.01,
    }
    write_tiny_params(
        tmp_path / "params.yaml", {f"coco_to_voc.{k}": v for k, v in coco_to_voc.items()}
    )
    raw, out = tmp_path / "raw", tmp_path / "coco_voc"
    for split in ("train2017", "val2017"):  # the real val sample stands in for both splits
        make_zips(raw, instances, images_dir, split=split)
    args = ("--raw-dir", str(raw), "--out", str(out), "--no-progress")
    stale = tmp_path / ".coco_voc.killed-run.tmp"  # what a SIGKILLed run leaves behind
    (stale / "train2017").mkdir(parents=True)
    res = _stage(repo_root, tmp_path, *args)
    assert res.returncode == 0, res.stderr
    assert not stale.exists()
    assert "coco_to_voc val2017: kept" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["splits"] == ["train2017", "val2017"]
    for split in ("train2017", "val2017"):
        r = report["splits"][split]
        reader = ShardReader(out / split)
        assert len(reader) == r["images_kept"] > 0
        assert r["images_kept"] + r["images_dropped"][cv.DROP_FEW_PIXELS]["count"] == 32
        assert {reader.meta(i)["split"] for i in range(len(reader))} == {split}
        reader.close()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    # a broken second split fails the stage with a clear error and keeps the old output whole
    make_zips(raw, b"garbage", images_dir, split="val2017")
    res = _stage(repo_root, tmp_path, *args)
    assert res.returncode == 1
    assert "error:" in res.stderr and "instances_val2017.json: not valid JSON" in res.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".coco_voc")]


def test_stage_help(repo_root):
    res = subprocess.run(
        [sys.executable, "stages/coco_to_voc.py", "--help"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "--raw-dir" in res.stdout and "report.json" in res.stdout
