"""pipeline.evaluation.metrics: the confusion matrix and the FCN paper's four metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import NUM_CLASSES
from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import confusion_matrix, segmentation_scores
from tests.helpers import import_or_skip

# A 3-class example, rows = ground truth, columns = prediction.
HIST3 = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])


def pixels_from_hist(hist: np.ndarray, n_ignored: int = 7, seed: int = 0):
    """Shuffled (pred, target) pixel lists realising `hist`, plus `n_ignored` 255 targets."""
    rng = np.random.default_rng(seed)
    gt, pr = [], []
    for i, j in np.ndindex(hist.shape):
        gt += [i] * int(hist[i, j])
        pr += [j] * int(hist[i, j])
    gt += [255] * n_ignored
    pr += rng.integers(0, hist.shape[0], n_ignored).tolist()
    order = rng.permutation(len(gt))
    return torch.tensor(pr)[order], torch.tensor(gt)[order]


def fast_hist(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The original FCN score.py: rows = ground truth a, columns = prediction b."""
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n**2).reshape(n, n)


def test_confusion_matrix_counts_the_hand_example():
    pred, target = pixels_from_hist(HIST3)
    hist = confusion_matrix(pred, target, num_classes=3)
    assert hist.dtype == torch.int64 and hist.shape == (3, 3)
    assert hist.tolist() == HIST3.tolist()


def test_four_metrics_by_hand():
    s = segmentation_scores(torch.tensor(HIST3))
    # pixel accuracy: diagonal 5+3+4 = 12 of 16 pixels
    assert s["pixel_accuracy"] == pytest.approx(12 / 16, abs=1e-12)
    # mean accuracy: rows 6, 6, 4 -> (5/6 + 3/6 + 4/4) / 3
    assert s["mean_class_accuracy"] == pytest.approx(7 / 9, abs=1e-12)
    assert s["per_class_accuracy"] == pytest.approx([5 / 6, 1 / 2, 1.0], abs=1e-12)
    # IoU: columns 7, 4, 5 -> 5/(6+7-5), 3/(6+4-3), 4/(4+5-4)
    assert s["per_class_iou"] == pytest.approx([5 / 8, 3 / 7, 4 / 5], abs=1e-12)
    assert s["mean_iou"] == pytest.approx(173 / 280, abs=1e-12)  # (5/8 + 3/7 + 4/5) / 3
    # f.w. IoU: (6 * 5/8 + 6 * 3/7 + 4 * 4/5) / 16
    assert s["fw_iou"] == pytest.approx(1333 / 2240, abs=1e-12)
    # Dice: 2 n_ii / (row + column)
    assert s["per_class_dice"] == pytest.approx([10 / 13, 6 / 10, 8 / 9], abs=1e-12)
    assert s["num_pixels"] == 16


def test_absent_classes_are_left_out_of_the_means():
    # class 2: predicted but never in the ground truth; class 3: in neither
    hist = np.array([[4, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = segmentation_scores(hist)
    assert s["per_class_iou"] == pytest.approx([4 / 6, 2 / 3, 0.0, None])
    assert s["per_class_iou"][3] is None and s["per_class_dice"][3] is None
    assert s["per_class_iou"][2] == 0.0  # a false positive class counts as 0 IoU
    assert s["mean_iou"] == pytest.approx((4 / 6 + 2 / 3 + 0.0) / 3)
    # accuracy (recall) is undefined for both classes without ground truth
    assert s["per_class_accuracy"][2] is None and s["per_class_accuracy"][3] is None
    assert s["mean_class_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(6 / 8)
    assert s["fw_iou"] == pytest.approx((5 * 4 / 6 + 3 * 2 / 3) / 8)


def test_empty_matrix_gives_nan_means_and_null_classes():
    s = segmentation_scores(np.zeros((3, 3), dtype=np.int64))
    assert all(math.isnan(s[k]) for k in ("pixel_accuracy", "mean_iou", "fw_iou"))
    assert s["per_class_iou"] == [None, None, None]


def test_matches_torchmetrics_on_random_maps_with_ignored_pixels():
    tm = import_or_skip("torchmetrics.classification")  # the oracle: never skipped in CI
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, NUM_CLASSES, (4, 61, 83), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.6,
        target.clamp(max=NUM_CLASSES - 1),
        torch.randint(0, NUM_CLASSES, target.shape, generator=g),
    )
    # every class in both maps, so torchmetrics' handling of absent classes does not matter
    assert set(target.unique().tolist()) == set(range(NUM_CLASSES)) | {255}
    assert set(pred.unique().tolist()) == set(range(NUM_CLASSES))

    hist = confusion_matrix(pred, target)
    s = segmentation_scores(hist)
    kw = {"num_classes": NUM_CLASSES, "ignore_index": 255}
    ref_hist = tm.MulticlassConfusionMatrix(**kw)(pred, target)
    assert torch.equal(hist, ref_hist.to(torch.int64))
    assert s["pixel_accuracy"] == pytest.approx(
        float(tm.MulticlassAccuracy(average="micro", **kw)(pred, target)), abs=1e-6
    )
    assert s["mean_class_accuracy"] == pytest.approx(
        float(tm.MulticlassAccuracy(average="macro", **kw)(pred, target)), abs=1e-6
    )
    assert s["mean_iou"] == pytest.approx(
        float(tm.MulticlassJaccardIndex(average="macro", **kw)(pred, target)), abs=1e-6
    )
    per_class = tm.MulticlassJaccardIndex(average="none", **kw)(pred, target)
    assert s["per_class_iou"] == pytest.approx(per_class.tolist(), abs=1e-6)


def voc_label_maps(voc_sample: Path) -> list[np.ndarray]:
    maps = []
    for png in sorted((voc_sample / "SegmentationClass").glob("*.png")):
        with Image.open(png) as im:
            assert im.mode == "P"  # np.array of a P image gives the class indices
            maps.append(np.array(im))
    return maps


def test_real_voc_labels_against_themselves_score_one(voc_sample):
    maps = voc_label_maps(voc_sample)
    assert len(maps) > 50
    hist = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for m in maps:
        t = torch.from_numpy(m)
        pred = t.clone()
        pred[pred == 255] = 0  # a prediction never says "void"; those pixels are ignored
        hist += confusion_matrix(pred, t)
    s = segmentation_scores(hist)
    for key in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou"):
        assert s[key] == 1.0, key
    present = set(np.unique(np.concatenate([m.ravel() for m in maps])).tolist()) - {255}
    for c in range(NUM_CLASSES):
        assert s["per_class_iou"][c] == (1.0 if c in present else None)
        assert s["per_class_dice"][c] == (1.0 if c in present else None)
    assert s["num_pixels"] == sum(int((m != 255).sum()) for m in maps)


def test_batched_chunked_and_dtypes_agree_with_numpy(voc_sample):
    maps = [m for m in voc_label_maps(voc_sample) if m.shape == (375, 500)][:6]
    rng = np.random.default_rng(1)
    target = np.stack(maps)  # 6 x 187,500 pixels: several CPU chunks
    assert target.size > 3 * metrics._CPU_CHUNK
    pred = np.where(rng.random(target.shape) < 0.5, target % 255, rng.integers(0, 21, target.shape))
    pred = pred.astype(np.uint8)
    ref = fast_hist(target.ravel(), pred.ravel(), NUM_CLASSES)  # 255 >= 21: left out
    per_map = sum(
        confusion_matrix(torch.from_numpy(p), torch.from_numpy(t))
        for p, t in zip(pred, target, strict=True)
    )
    assert per_map.tolist() == ref.tolist()
    for p, t in [
        (pred, target),  # numpy uint8
        (torch.from_numpy(pred).long(), torch.from_numpy(target).long()),  # as evaluate has them
        (torch.from_numpy(pred).int(), torch.from_numpy(target)),
    ]:
        assert confusion_matrix(p, t).tolist() == ref.tolist()
    # the general (masked) path for a negative ignore label gives the same counts
    t_neg = torch.from_numpy(target).long()
    t_neg[t_neg == 255] = -1
    assert confusion_matrix(torch.from_numpy(pred), t_neg, ignore_index=-1).tolist() == ref.tolist()


@pytest.mark.parametrize("bad", [21, 100, 254, -2, 256, 1000])
def test_invalid_target_values_are_refused(bad):
    target = torch.zeros(4, 5, dtype=torch.int64)
    target[1, 2] = bad
    with pytest.raises(ValueError, match=rf"\[{bad}\]"):
        confusion_matrix(torch.zeros(4, 5, dtype=torch.int64), target)


def test_other_bad_inputs_are_refused():
    t = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="pred holds class ids outside"):
        confusion_matrix(torch.full((2, 3), 21), t)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.zeros(2, 4, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="integer class ids"):
        confusion_matrix(torch.zeros(2, 3), t)
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(np.zeros((3, 4)))


def test_empty_input_and_custom_class_count():
    empty = torch.zeros(0, dtype=torch.int64)
    assert confusion_matrix(empty, empty, num_classes=4).tolist() == [[0] * 4] * 4
    # more classes than a uint8 map can hold: still counted
    pred = torch.tensor([299, 5, 255])
    target = torch.tensor([299, 7, 255])
    hist = confusion_matrix(pred, target, num_classes=300, ignore_index=-1)
    assert hist[299, 299] == 1 and hist[7, 5] == 1 and hist[255, 255] == 1 and hist.sum() == 3


def test_the_dvc_metrics_file_holds_the_headline_only_and_per_class_goes_elsewhere():
    import json

    from pipeline.evaluation.summary import metrics_json, per_class_iou_csv, per_class_json

    s = segmentation_scores(np.array([[4, 2, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    m = metrics_json(s)  # metrics/<model>.json: a handful of flat numbers
    assert list(m) == ["pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou", "mean_dice"]
    assert all(isinstance(v, float) for v in m.values())
    names = ["a", "b", "c", "d"]
    per_class = json.loads(json.dumps(per_class_json(s, names)))  # JSON-safe: null for NaN
    assert per_class["per_class_iou"] == {"a": 4 / 7, "b": 2 / 6, "c": 0.0, "d": None}
    assert per_class["per_class_dice"]["d"] is None
    rows = per_class_iou_csv(s, names).splitlines()  # the plot keeps IoU and Dice per class
    assert rows[0] == "class,iou,dice" and rows[4] == "d,,"
    with pytest.raises(ValueError):
        per_class_json(s, names[:3])
