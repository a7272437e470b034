"""pipeline.evaluation.{score,evaluate} + stages/evaluate.py on real VOC val images in a tiny shard dir."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import NUM_CLASSES, VOC_CLASSES
from pipeline.config import CASCADE
from pipeline.data.transforms import normalize
from pipeline.evaluation.evaluate import (
    ReportSettings,
    RunSettings,
    ValSet,
    evaluate_all,
    qualitative_indices,
    qualitative_samples,
    ranked_indices,
    val_datasets,
)
from pipeline.evaluation.metrics import confusion_matrix, segmentation_scores
from pipeline.evaluation.score import evaluate_model, image_scores
from pipeline.evaluation.summary import confusion_csv, summary_table
from pipeline.models import fcn
from tests.helpers import TinyFCN, write_val_shards
from tests.repo_utils import write_tiny_params

REPO = Path(__file__).resolve().parents[1]


def load_stage():
    """stages/evaluate.py as a module (its name would clash with other `evaluate` modules)."""
    spec = importlib.util.spec_from_file_location("stage_evaluate", REPO / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def val_ids(voc_sample: Path) -> list[str]:
    ids = (voc_sample / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    # not in key order, and three 500x375 images in a row (batched together)
    return [ids[4], ids[0], ids[2], ids[1], ids[3]]


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory, voc_sample: Path, val_ids: list[str]) -> Path:
    return write_val_shards(tmp_path_factory.mktemp("data") / "val", voc_sample, val_ids)


@pytest.fixture(scope="module")
def small_val_dir(tmp_path_factory, voc_sample: Path, val_ids: list[str]) -> Path:
    """Three images: enough for the report files, quick for three models."""
    return write_val_shards(tmp_path_factory.mktemp("small") / "val", voc_sample, val_ids[:3])


def test_evaluate_model_counts_every_labelled_pixel_once(val_dir: Path):
    eval_set, raw_set = val_datasets(val_dir)
    model = TinyFCN(0)
    hist = evaluate_model(
        model, eval_set, device="cpu", precision="fp32", channels_last=False, progress=False
    )
    assert hist.dtype == torch.int64 and hist.shape == (NUM_CLASSES, NUM_CLASSES)
    # reference: one image at a time from the raw uint8 images, normalised here
    ref = torch.zeros_like(hist)
    labelled = 0
    with torch.no_grad():
        for i in range(len(raw_set)):
            image, mask = raw_set[i]
            pred = model(normalize(torch.as_tensor(image)[None])).argmax(1)
            ref += confusion_matrix(pred, torch.as_tensor(mask)[None])
            labelled += int((torch.as_tensor(mask) != 255).sum())
    assert int(hist.sum()) == labelled
    assert hist.sum(1).tolist() == ref.sum(1).tolist()  # ground-truth counts: exact
    assert (hist - ref).abs().sum() <= 1e-4 * labelled  # predictions: up to float rounding
    batched = evaluate_model(
        model, eval_set, device="cpu", precision="fp32", batch_size=3, progress=False
    )
    assert batched.sum(1).tolist() == hist.sum(1).tolist()
    assert (batched - hist).abs().sum() <= 1e-4 * labelled


def test_a_bad_label_map_is_named(tmp_path: Path, voc_sample: Path, val_ids: list[str]):
    bad = np.zeros((375, 500), np.uint8)
    bad[10, 10] = 30
    buf = io.BytesIO()
    Image.fromarray(bad).save(buf, format="PNG")
    d = write_val_shards(tmp_path / "val", voc_sample, val_ids[:2], {val_ids[1]: buf.getvalue()})
    eval_set, _ = val_datasets(d)
    with pytest.raises(ValueError, match=rf"voc/{val_ids[1]}.*\[30\]"):
        evaluate_model(TinyFCN(), eval_set, device="cpu", precision="fp32", progress=False)


def test_qualitative_images_are_the_first_keys(val_dir: Path, val_ids: list[str]):
    _, raw_set = val_datasets(val_dir)
    idx = qualitative_indices(raw_set, 3)
    assert [raw_set.key(i) for i in idx] == [f"voc/{k}" for k in sorted(val_ids)[:3]]
    samples = qualitative_samples(TinyFCN(), raw_set, idx, device="cpu", precision="fp32")
    for key, image, gt, pred in samples:
        assert image.dtype == np.uint8 and image.shape == (*gt.shape, 3)
        assert pred.shape == gt.shape and pred.max() < NUM_CLASSES
        assert key.startswith("voc/")


def labelled_pixels(val_dir: Path) -> int:
    """Pixels of the val set's label maps that are not 255, counted from the shards."""
    _, raw_set = val_datasets(val_dir)
    return sum(int((torch.as_tensor(raw_set[i][1]) != 255).sum()) for i in range(len(raw_set)))


def check_outputs(out: Path, results: dict, n_qualitative: int, labelled: int) -> None:
    for name in CASCADE:
        m = json.loads((out / "metrics" / f"{name}.json").read_text())
        # the DVC metrics: the headline numbers only, flat (per class: the plot's CSV)
        assert list(m) == [
            "pixel_accuracy",
            "mean_class_accuracy",
            "mean_iou",
            "fw_iou",
            "mean_dice",
        ]
        assert m["mean_iou"] == pytest.approx(results[name]["mean_iou"])
        assert m["mean_dice"] == pytest.approx(results[name]["mean_dice"])
        assert 0.0 <= m["pixel_accuracy"] <= 1.0
        plots = out / "plots" / name
        rows = list(csv.DictReader((plots / "per_class_iou.csv").open()))
        assert len(rows) == 21 and [r["class"] for r in rows] == list(VOC_CLASSES)
        per_class = zip(
            rows, results[name]["per_class_iou"], results[name]["per_class_dice"], strict=True
        )
        for r, iou, dice in per_class:
            for col, v in (("iou", iou), ("dice", dice)):
                assert (r[col] == "") if v is None else float(r[col]) == pytest.approx(v, abs=1e-6)
        for col, mean in (("iou", m["mean_iou"]), ("dice", m["mean_dice"])):
            defined = [float(r[col]) for r in rows if r[col] != ""]
            assert mean == pytest.approx(sum(defined) / len(defined), abs=1e-5)
        cells = list(csv.DictReader((plots / "confusion.csv").open()))
        assert len(cells) == NUM_CLASSES**2
        assert sum(int(c["count"]) for c in cells) == labelled
        images = list(csv.DictReader((plots / "per_image.csv").open()))
        assert sum(int(r["labelled_pixels"]) for r in images) == labelled
        for png in ("confusion.png", "qualitative.png", "worst.png", "best.png"):
            with Image.open(plots / png) as im:
                assert im.format == "PNG" and im.width > 200
                if png != "confusion.png":
                    assert im.height > 150 * n_qualitative
    summary = (out / "reports" / "summary.md").read_text()
    for name, label in zip(CASCADE, ("FCN-32s", "FCN-16s", "FCN-8s"), strict=True):
        assert f"| {label} | {100 * results[name]['pixel_accuracy']:.1f} |" in summary
    assert "| pixel acc. | mean acc. | mean IU | f.w. IU | mean Dice (F1) |" in summary
    assert "## Dice (F1) per class (%)" in summary
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def test_evaluate_all_writes_every_output(tmp_path: Path, small_val_dir: Path, capsys):
    seeds = {name: k for k, name in enumerate(CASCADE)}
    results = evaluate_all(
        lambda name: TinyFCN(seeds[name]),
        CASCADE,
        ValSet(small_val_dir),
        tmp_path,
        RunSettings(device="cpu", precision="fp32", progress=False),
        ReportSettings(qualitative_images=2),
    )
    assert list(results) == list(CASCADE)
    check_outputs(tmp_path, results, 2, labelled_pixels(small_val_dir))
    printed = capsys.readouterr().out
    assert summary_table(results) in printed  # the table is printed at the end


def test_stage_refuses_missing_models(tmp_path: Path, val_dir: Path, capsys):
    stage = load_stage()
    rc = stage.main(
        ["--params", str(write_tiny_params(tmp_path / "params.yaml")), "--models", str(tmp_path)]
        + ["--data", str(val_dir)]
    )
    assert rc == 1
    assert "fcn32s.pt: model file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_end_to_end_with_real_models(tmp_path: Path, small_val_dir: Path):
    write_tiny_params(  # quick
        tmp_path / "params.yaml", {"evaluate.precision": "fp32", "evaluate.qualitative_images": 1}
    )
    models = tmp_path / "models"
    for name in CASCADE:
        torch.manual_seed(0)
        fcn.save_model(
            models / f"{name}.pt", fcn.build_model(name, num_classes=NUM_CLASSES, width=1 / 32)
        )
    stage = load_stage()
    out = tmp_path / "out"
    args = ["--params", tmp_path / "params.yaml", "--models", models, "--data", small_val_dir]
    rc = stage.main([str(a) for a in [*args, "--out", out, "--workers", 0, "--no-progress"]])
    assert rc == 0
    results = {n: json.loads((out / "metrics" / f"{n}.json").read_text()) for n in CASCADE}
    for n, r in results.items():  # per class: from the plot's CSV (the metrics hold means only)
        rows = list(csv.DictReader((out / "plots" / n / "per_class_iou.csv").open()))
        for col in ("iou", "dice"):
            r[f"per_class_{col}"] = [float(row[col]) if row[col] else None for row in rows]
    check_outputs(out, results, 1, labelled_pixels(small_val_dir))


def test_per_image_rows_sum_to_the_set_matrix_and_rank_worst_first(val_dir: Path):
    eval_set, _ = val_datasets(val_dir)
    rows: list[dict] = []
    hist = evaluate_model(
        TinyFCN(), eval_set, device="cpu", precision="fp32", progress=False, per_image=rows
    )
    plain = evaluate_model(TinyFCN(), eval_set, device="cpu", precision="fp32", progress=False)
    assert torch.equal(hist, plain)  # per-image bookkeeping changes nothing
    assert [r["index"] for r in rows] == list(range(len(eval_set)))
    assert sum(r["labelled_pixels"] for r in rows) == int(hist.sum())
    worst, best = ranked_indices(rows, 2)
    by_index = {r["index"]: r["mean_iou"] for r in rows}
    scored = sorted(v for v in by_index.values() if v is not None)
    assert [by_index[i] for i in worst] == scored[:2]
    assert [by_index[i] for i in best] == scored[::-1][:2]


def test_image_scores_by_hand():
    # 2 classes present: background 6 px (5 right), class 1 4 px (3 right, 1 called background)
    h = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    h[0, 0], h[0, 1], h[1, 1], h[1, 0] = 5, 1, 3, 1
    s = image_scores(h)
    assert s["labelled_pixels"] == 10
    assert s["pixel_accuracy"] == pytest.approx(8 / 10)
    assert s["mean_iou"] == pytest.approx((5 / 7 + 3 / 5) / 2)
    empty = image_scores(torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64))
    assert empty == {"labelled_pixels": 0, "pixel_accuracy": None, "mean_iou": None}


def test_confusion_csv_lists_every_cell_in_class_order():
    h = np.arange(NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    rows = list(csv.DictReader(io.StringIO(confusion_csv(h))))
    assert len(rows) == 441
    assert rows[0] == {"actual": "background", "predicted": "background", "count": "0"}
    assert rows[22] == {"actual": VOC_CLASSES[1], "predicted": VOC_CLASSES[1], "count": "22"}
    assert sum(int(r["count"]) for r in rows) == int(h.sum())
    with pytest.raises(ValueError, match="does not match 21 classes"):
        confusion_csv(np.zeros((3, 3)))


def test_tta_flip_of_a_mirror_symmetric_model_changes_nothing_and_is_reported(
    tmp_path: Path, small_val_dir: Path
):
    from pipeline.evaluation.tta import TestTimeAugmentation

    class Mirror(torch.nn.Module):  # logits symmetric under a left-right flip of the input
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyFCN(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + self.net(x.flip(-1)).flip(-1)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 45)
    m = Mirror().eval()
    with torch.no_grad():
        plain, tta = m(x), TestTimeAugmentation(m, flip=True)(x)
    assert tta.shape == plain.shape
    assert torch.equal(tta.argmax(1), plain.argmax(1))
    assert torch.allclose(tta.exp().sum(1), torch.ones(2, 37, 45), atol=1e-5)  # probabilities

    results = evaluate_all(
        lambda name: TinyFCN(1),
        ["fcn8s"],
        ValSet(small_val_dir),
        tmp_path,
        RunSettings(device="cpu", precision="fp32", progress=False),
        ReportSettings(qualitative_images=1, tta_flip=True, tta_scales=[0.5, 1.0]),
    )
    assert not (tmp_path / "metrics" / "tta").exists()  # a plain report, not DVC metrics
    tta_json = json.loads((tmp_path / "reports" / "tta" / "fcn8s.json").read_text())
    assert tta_json["tta"] == "flip, scales 0.5/1"
    assert 0.0 <= tta_json["mean_iou"] <= 1.0
    assert list(tta_json["per_class_iou"]) == list(tta_json["per_class_dice"]) == list(VOC_CLASSES)
    eval_set, _ = val_datasets(small_val_dir)
    by_hand = evaluate_model(
        TestTimeAugmentation(TinyFCN(1), flip=True, scales=[0.5, 1.0]),
        eval_set,
        device="cpu",
        precision="fp32",
        progress=False,
    )
    assert tta_json["mean_iou"] == pytest.approx(segmentation_scores(by_hand)["mean_iou"])
    assert results["fcn8s"]["num_pixels"] == int(by_hand.sum())  # same pixels, other views
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "## With test-time augmentation (flip, scales 0.5/1)" in summary
    with pytest.raises(ValueError, match="positive"):
        TestTimeAugmentation(m, scales=[0.0])
