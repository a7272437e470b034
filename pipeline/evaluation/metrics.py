"""The FCN paper's four segmentation metrics, from one confusion matrix over the whole val set.

Long, Shelhamer & Darrell (Sec. 5) report, with n_ij the number of pixels of class i predicted
as class j, t_i = sum_j n_ij the pixels of class i and n_cl the number of classes:

    pixel accuracy          sum_i n_ii / sum_i t_i
    mean (class) accuracy   (1/n_cl) sum_i n_ii / t_i
    mean IU                 (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
    frequency weighted IU   (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

The matrix is accumulated over all images first (not averaged per image), pixels labelled 255
(VOC's boundary/void label) are ignored, and a class absent from both the ground truth and the
predictions has no defined IoU: it is left out of the means and reported as None, never as 0
or 1 (the original `score.py` does the same with `np.nanmean`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES

# On the CPU the maps are counted in slices below ATen's parallel grain size (32768): every op
# then runs inline on the calling thread. Above it each op opens an OpenMP region, and on a
# busy machine (DataLoader workers, other jobs) waking the second thread can take milliseconds:
# casting one 500x375 map took 10 us on one thread and 17 ms on two at load average 9 on 2 cores.
# A slice's int16 index (64 KB) also stays in cache through the elementwise passes and bincount.
_CPU_CHUNK = 32767
_ROWS = 256  # label maps are uint8 PNGs: every possible target value gets a row


def _minmax(t: torch.Tensor) -> tuple[int, int]:
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def _check_integer(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few kernels support these
        t = t.to(torch.int64)
    return t


def _row_table(
    pred: torch.Tensor, target: torch.Tensor, rows: int, num_classes: int
) -> torch.Tensor | None:
    """Counts of (target row, pred) over `rows` x C bins, or None if a target is outside
    [0, rows) (the caller then takes the general path). A pred outside [0, C) is a ValueError.

    One bincount of `target * C + pred`, with no boolean mask: ignored and invalid target
    values land in rows of their own (checked or dropped by the caller). Masking (`x[valid]`)
    compacts both maps and costs more than the whole count.
    """
    c = num_classes
    bins = rows * c
    idx_dtype = torch.int16 if bins <= torch.iinfo(torch.int16).max + 1 else torch.int32
    n = pred.numel()
    chunk = _CPU_CHUNK if pred.device.type == "cpu" else n
    table = torch.zeros(bins, dtype=torch.int64, device=pred.device)
    for start in range(0, n, chunk):
        p, t = pred[start : start + chunk], target[start : start + chunk]
        pmin, pmax = _minmax(p)
        if pmin < 0 or pmax >= c:
            raise ValueError(
                f"pred holds class ids outside [0, {c}): min {pmin}, max {pmax} "
                f"(pass argmax indices, not logits or colours)"
            )
        if t.dtype != torch.uint8:  # a wider id would wrap around in the narrow index
            tmin, tmax = _minmax(t)
            if tmin < 0 or tmax >= rows:
                return None
        idx = t.to(idx_dtype).mul_(c).add_(p)
        table += torch.bincount(idx, minlength=bins)
    return table.view(rows, c)


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """int64 (C, C) counts: rows are ground-truth classes, columns predicted classes.

    `pred` and `target` hold class ids of the same shape (any shape, batches included; numpy
    arrays are accepted). Pixels whose target is `ignore_index` are skipped. The count runs on
    `pred`'s device (torch.bincount), with no per-pixel Python. A target value outside
    [0, C) other than `ignore_index`, or a prediction outside [0, C), is a ValueError.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred = _check_integer("pred", torch.as_tensor(pred))
    target = _check_integer("target", torch.as_tensor(target, device=pred.device))
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    c = num_classes
    if pred.numel() == 0:
        return torch.zeros(c, c, dtype=torch.int64, device=pred.device)
    pred, target = pred.reshape(-1), target.reshape(-1)

    rows = max(_ROWS, c)
    table = _row_table(pred, target, rows, c) if 0 <= ignore_index < rows else None
    if table is not None:
        counts = table[c:].sum(1).tolist()
        bad = [c + i for i, n in enumerate(counts) if n and c + i != ignore_index]
        if bad:
            raise ValueError(
                f"target holds values {bad[:10]} outside [0, {c}) that are not ignore_index "
                f"{ignore_index}"
            )
        return table[:c].contiguous()

    # Rare general case (negative or large ids, e.g. ignore_index=-1): mask, then count.
    pmin, pmax = _minmax(pred)
    if pmin < 0 or pmax >= c:
        raise ValueError(f"pred holds class ids outside [0, {c}): min {pmin}, max {pmax}")
    valid = target != ignore_index
    t, p = target[valid].to(torch.int64), pred[valid].to(torch.int64)
    bad_mask = (t < 0) | (t >= c)
    if bool(bad_mask.any()):
        bad = torch.unique(t[bad_mask])[:10].tolist()
        raise ValueError(
            f"target holds values {bad} outside [0, {c}) that are not ignore_index {ignore_index}"
        )
    return torch.bincount(t * c + p, minlength=c * c).view(c, c)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def pixel_accuracy(hist: np.ndarray) -> float:
    """Correct pixels over all valid pixels."""
    total = hist.sum()
    return float(np.diag(hist).sum() / total) if total else float("nan")


def per_class_accuracy(hist: np.ndarray) -> np.ndarray:
    """Recall n_ii / t_i; NaN for a class with no ground-truth pixel."""
    return _safe_div(np.diag(hist), hist.sum(1))


def per_class_iou(hist: np.ndarray) -> np.ndarray:
    """n_ii / (t_i + sum_j n_ji - n_ii); NaN for a class absent from ground truth and prediction."""
    tp = np.diag(hist)
    return _safe_div(tp, hist.sum(1) + hist.sum(0) - tp)


def per_class_dice(hist: np.ndarray) -> np.ndarray:
    """2 n_ii / (t_i + sum_j n_ji); NaN where IoU is NaN."""
    return _safe_div(2 * np.diag(hist), hist.sum(1) + hist.sum(0))


def frequency_weighted_iou(hist: np.ndarray) -> float:
    """IoU weighted by each class's share of the ground-truth pixels."""
    total = hist.sum()
    if not total:
        return float("nan")
    t = hist.sum(1)
    iou = per_class_iou(hist)
    has_gt = t > 0  # a class with t_i > 0 always has a defined IoU
    return float((t[has_gt] * iou[has_gt]).sum() / total)  # one division: exact 1.0 when perfect


def segmentation_scores(hist: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """The four FCN metrics, mean Dice, and per-class IoU, Dice and accuracy from a confusion
    matrix `hist` (C, C) of int counts, rows = ground truth, columns = prediction.

    Dice (= F1) per class is 2 TP / (2 TP + FP + FN); it ranks classes like IoU (Dice =
    2 IoU / (1 + IoU)) but its mean is what medical and remote-sensing reports quote.

    Means are over the classes for which the value is defined; undefined per-class values are
    None (JSON null). Everything is a plain Python float, ready for json.dump.
    """
    h = hist.detach().cpu().numpy() if isinstance(hist, torch.Tensor) else np.asarray(hist)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {h.shape}")
    if (h < 0).any():
        raise ValueError("confusion matrix holds negative counts")
    h = h.astype(np.float64)
    acc = per_class_accuracy(h)
    iou = per_class_iou(h)
    dice = per_class_dice(h)
    return {
        "pixel_accuracy": pixel_accuracy(h),
        "mean_class_accuracy": _nanmean(acc),
        "mean_iou": _nanmean(iou),
        "fw_iou": frequency_weighted_iou(h),
        "mean_dice": _nanmean(dice),
        "per_class_iou": _nan_to_none(iou),
        "per_class_dice": _nan_to_none(dice),
        "per_class_accuracy": _nan_to_none(acc),
        "num_pixels": int(h.sum()),
    }
