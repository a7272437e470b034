"""pipeline.reports.data_card + stages/data_card.py on small shard dirs whose label maps the test knows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, voc_palette_flat
from pipeline.data import label_counts
from pipeline.data.drop_reasons import coco_dropped, preprocess_dropped, preprocess_reason
from pipeline.data.label_counts import DataCardError, count_dataset, source_order
from pipeline.data.shards import ShardWriter
from pipeline.reports.data_card import (
    CARD,
    CLASS_PIXELS_CSV,
    COUNTS_JSON,
    METRICS_JSON,
    card_markdown,
    class_pixels_csv,
    counts_json,
    metrics_json,
    write_data_card,
)
from stages import data_card as stage
from tests.repo_utils import write_tiny_params


def png_l(label: np.ndarray) -> bytes:
    """An 8-bit greyscale label PNG, as preprocess writes the training labels."""
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


def png_palette(label: np.ndarray) -> bytes:
    """A VOC palette label PNG, as the val records keep them."""
    im = Image.new("P", (label.shape[1], label.shape[0]))
    im.frombytes(label.tobytes())
    im.putpalette(voc_palette_flat())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def random_label(rng: np.random.Generator, classes: list[int]) -> np.ndarray:
    h, w = rng.integers(8, 40, size=2)
    values = np.array([*classes, IGNORE_INDEX], np.uint8)
    label = values[rng.integers(0, len(values), size=(h, w))]
    label[: h // 2] = 0  # background, as in real maps
    return label


# (split, source, number of records, classes they hold): voc in both splits, coco and sbd train
LAYOUT = [
    ("train", "voc", 3, [0, 1, 15]),
    ("train", "coco", 4, [0, 7, 12, 20]),
    ("train", "sbd", 2, [0, 3]),
    ("val", "voc", 3, [0, 1, 8, 15]),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """data/preprocessed as preprocess writes it (records interleaved by source, shard_size 2)
    and the counts recomputed here from the label arrays themselves."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data") / "preprocessed"
    expected: dict = {}
    records: dict[str, list] = {"train": [], "val": []}
    for split, source, n, classes in LAYOUT:
        for i in range(n):
            records[split].append((source, i, random_label(rng, classes)))
    for split, recs in records.items():
        recs.sort(key=lambda r: r[1])  # sources interleaved, not grouped
        with ShardWriter(root / split, shard_size=2) as w:
            for source, i, label in recs:
                png = png_palette(label) if split == "val" else png_l(label)
                h, wd = label.shape
                meta = {"height": int(h), "width": int(wd), "source": source}
                w.add(f"{source}/{i}", {"image": b"not read", "label": png}, meta)
                c = expected.setdefault(source, {}).setdefault(
                    split, {"images": 0, "class_pixels": [0] * NUM_CLASSES, "ignore_pixels": 0}
                )
                hist = np.bincount(label.reshape(-1), minlength=256)
                c["images"] += 1
                c["class_pixels"] = [
                    a + int(b) for a, b in zip(c["class_pixels"], hist[:NUM_CLASSES], strict=True)
                ]
                c["ignore_pixels"] += int((label == IGNORE_INDEX).sum())
    (root / "report.json").write_text(json.dumps(PREPROCESS_REPORT))
    return root, expected


COCO_REPORT = {
    "params": {"splits": ["train2017", "val2017"], "min_pixels": 200},
    "splits": {
        split: {
            "images_total": total,
            "images_kept": total - few - 1,
            "images_dropped": {
                "missing_from_images_zip": {"count": 1, "ids": [9], "ids_truncated": False},
                "below_min_pixels": {"count": few, "ids": [], "ids_truncated": False},
                "voc_object_without_region": {"count": 0, "ids": [], "ids_truncated": False},
            },
            "annotations_total": 50,
            "annotations_used_voc": 40,
            "annotations_non_voc": 7,
            "annotations_voc_marked_ignore": 1,
            "annotations_skipped": 2,
            "annotations_skipped_by_reason": {
                "malformed_annotation": {"count": 2, "ids": [], "ids_truncated": False},
                "no_segmentation": {"count": 0, "ids": [], "ids_truncated": False},
            },
            "voc_objects_parts_dropped_by_reason": {
                "polygon_off_image": {"count": parts, "ids": [], "ids_truncated": False},
            },
            "voc_objects_marked_ignore_by_reason": {
                "bad_segmentation": {"count": 1, "ids": [], "ids_truncated": False},
            },
        }
        for split, total, few, parts in (("train2017", 40, 5, 3), ("val2017", 8, 2, 0))
    },
}
PREPROCESS_REPORT = {
    "params": {"max_bad_fraction": 0.01},
    "inputs": 14,
    "skipped": [
        {"key": "voc/a", "split": "train", "member": "x", "reason": "label values outside 0..20/255: [21]"},
        {"key": "voc/b", "split": "train", "member": "x", "reason": "label values outside 0..20/255: [40, 99]"},
        {"key": "coco/c", "split": "train", "member": "x", "reason": "corrupt image (Premature end of JPEG file)"},
        {"key": "voc/d", "split": "val", "member": "x", "reason": "label is 10x20 but its image d.jpg is 11x20"},
        {"key": "coco/e", "split": "train", "member": "x", "reason": "not a PNG file (starts with b'GIF89a')"},
    ],
}  # fmt: skip


def test_counts_are_the_label_maps_pixels(dataset):
    root, expected = dataset
    counts = count_dataset(root)
    assert counts == expected
    assert list(counts) == ["voc", "coco", "sbd"]  # the card's order, not the shards'
    assert list(counts["voc"]) == ["train", "val"]


def test_counts_do_not_depend_on_workers(dataset, monkeypatch):
    root, expected = dataset
    monkeypatch.setattr(label_counts, "_CHUNK", 2)  # several tasks per split: the pool runs
    assert count_dataset(root, workers=2) == expected


def test_metrics_and_csv_hold_the_recomputed_numbers(dataset):
    root, expected = dataset
    counts = count_dataset(root)
    per_source = counts_json(counts)
    for source, splits in expected.items():
        for split, c in splits.items():
            labelled = sum(c["class_pixels"])
            assert per_source[source][split] == {"images": c["images"], "labelled_pixels": labelled}
    # the DVC metrics: images per split over all sources, flat
    assert metrics_json(counts) == {
        f"{split}_images": sum(s[split]["images"] for s in expected.values() if split in s)
        for split in ("train", "val")
    }
    rows = list(csv.DictReader(io.StringIO(class_pixels_csv(counts))))
    assert len(rows) == NUM_CLASSES * 4
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["split"]), []).append(r)
    assert list(groups) == [("voc", "train"), ("voc", "val"), ("coco", "train"), ("sbd", "train")]
    for (source, split), group in groups.items():
        c = expected[source][split]
        assert [r["class"] for r in group] == list(VOC_CLASSES)
        assert [int(r["pixels"]) for r in group] == c["class_pixels"]
        assert sum(float(r["share"]) for r in group) == pytest.approx(1.0, abs=1e-6)
        for r, pixels in zip(group, c["class_pixels"], strict=True):
            assert float(r["share"]) == pytest.approx(pixels / sum(c["class_pixels"]), abs=1e-8)


def test_card_shows_the_counts_and_the_reports_reasons(dataset):
    root, expected = dataset
    counts = count_dataset(root)
    md = card_markdown(counts, COCO_REPORT, PREPROCESS_REPORT, generate_sample=False)
    voc_train = expected["voc"]["train"]
    row = f"| {voc_train['images']} | {sum(voc_train['class_pixels']):,} | "
    assert f"| voc (PASCAL VOC 2012) | train {row}" in md
    sbd = expected["sbd"]["train"]
    assert f"| train | {sbd['images']} | {sum(sbd['class_pixels']):,} | " in md
    train_images = sum(expected[s]["train"]["images"] for s in ("voc", "coco", "sbd"))
    assert f"| **all sources** | train | {train_images} |" in md
    # coco_to_voc: every reason with its count per split, from the given report
    assert "| images dropped | `below_min_pixels` | 5 | 2 |" in md
    assert "| images dropped | `missing_from_images_zip` | 1 | 1 |" in md
    assert "| VOC objects kept, polygon parts dropped | `polygon_off_image` | 3 | 0 |" in md
    assert "| annotations skipped | `malformed_annotation` | 2 | 2 |" in md
    # preprocess: by split, source and kind of reason
    assert "5 of 14 input pairs skipped" in md
    assert "| train | voc | label values outside 0..20/255 | 2 |" in md
    assert "| val | voc | image and label sizes differ | 1 |" in md
    # the rules, the torchvision comparison with this run's counts, the terms
    assert "`min_pixels` = 200" in md and "masks.sum(0) > 1" in md and "> 1000" in md
    assert "train2017: 34 of 40 kept, 5 below min_pixels" in md
    assert "CC BY 4.0" in md and "Flickr" in md and "research use" in md
    assert "generated sample" not in md
    sample = card_markdown(counts, COCO_REPORT, PREPROCESS_REPORT, generate_sample=True)
    assert "generated sample" in sample
    assert "left out of training" not in md  # no SBD exclusion in this report
    noval = {**PREPROCESS_REPORT, "sbd_excluded_voc2012_val": 1_087}
    with_exclusion = card_markdown(counts, COCO_REPORT, noval, generate_sample=False)
    assert "1,087 SBD train images left out of training" in with_exclusion


def test_dropped_by_reason_come_from_the_given_reports():
    rows = coco_dropped(COCO_REPORT)
    assert ("images dropped", "below_min_pixels", {"train2017": 5, "val2017": 2}) in rows
    assert (
        rows[0][0] == "images dropped" and rows[-1][0] == "VOC objects kept, polygon parts dropped"
    )
    assert preprocess_dropped(PREPROCESS_REPORT) == [
        ("train", "coco", "image does not decode", 1),
        ("train", "coco", "label map does not decode", 1),
        ("train", "voc", "label values outside 0..20/255", 2),
        ("val", "voc", "image and label sizes differ", 1),
    ]
    assert preprocess_reason("CRC mismatch in member x") == "unreadable archive member or other"
    assert preprocess_dropped({"skipped": []}) == []


def test_source_order_puts_known_sources_first():
    assert source_order(["zz", "sbd", "coco", "aa", "voc"]) == ["voc", "coco", "sbd", "aa", "zz"]


def test_outputs_are_byte_identical_on_a_second_run(dataset, tmp_path):
    root, _ = dataset
    coco = tmp_path / "coco_report.json"
    coco.write_text(json.dumps(COCO_REPORT))
    outputs = (CARD, CLASS_PIXELS_CSV, COUNTS_JSON, METRICS_JSON)
    write_data_card(root, coco, tmp_path / "a", generate_sample=False)
    first = {p: (tmp_path / "a" / p).read_bytes() for p in outputs}
    write_data_card(root, coco, tmp_path / "a", generate_sample=False, workers=2)
    write_data_card(root, coco, tmp_path / "b", generate_sample=False)
    for p in outputs:
        assert (tmp_path / "a" / p).read_bytes() == first[p], p
        assert (tmp_path / "b" / p).read_bytes() == first[p], p
    assert not list((tmp_path / "a").rglob(".*.tmp"))  # atomic writes leave nothing behind


def test_a_label_value_outside_the_classes_is_an_error(tmp_path):
    label = np.zeros((4, 4), np.uint8)
    label[0, 0] = 21
    for split in ("train", "val"):
        with ShardWriter(tmp_path / split) as w:
            w.add("voc/x", {"image": b"", "label": png_l(label)}, {"source": "voc"})
    with pytest.raises(DataCardError, match=r"voc/x.*outside 0\.\.20/255: \[21\]"):
        count_dataset(tmp_path)


def test_stage_help(capsys):
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "data_card" in out and "--coco-report" in out


def test_stage_writes_the_outputs(dataset, tmp_path, capsys):
    root, expected = dataset
    coco = tmp_path / "report.json"
    coco.write_text(json.dumps(COCO_REPORT))
    params = write_tiny_params(tmp_path / "params.yaml")  # the test suite's sample profile
    args = ["--params", str(params), "--data", str(root), "--coco-report", str(coco)]
    assert stage.main([*args, "--out", str(tmp_path), "--workers", "1"]) == 0
    per_source = json.loads((tmp_path / COUNTS_JSON).read_text())
    assert per_source["coco"]["train"]["images"] == expected["coco"]["train"]["images"]
    metrics = json.loads((tmp_path / METRICS_JSON).read_text())
    assert list(metrics) == ["train_images", "val_images"]
    assert metrics["val_images"] == sum(s["val"]["images"] for s in expected.values() if "val" in s)
    assert "generated sample" in (tmp_path / CARD).read_text()  # params.yaml: the sample
    assert "data_card: voc: train" in capsys.readouterr().out
    # a missing input names the stage that makes it
    assert stage.main([*args[:4], "--coco-report", str(tmp_path / "none.json")]) == 1
    assert "coco_to_voc" in capsys.readouterr().err
