"""Score FCN-32s/16s/8s on VOC 2012 val at original resolution, as the paper's Table 2 does.

Each model runs on every val image at its original size (batch 1 unless consecutive images
share a size), one confusion matrix is accumulated over the whole set on the model's device,
and the four metrics come from it (pipeline.evaluation.metrics). Outputs, all written atomically:

    metrics/<model>.json                 DVC metrics: the four metrics, mean Dice (F1), and
                                         IoU and Dice per class
    plots/<model>/per_class_iou.csv      class,iou,dice (one row per class; a bar chart)
    plots/<model>/confusion.csv          actual,predicted,count: all C x C cells, for the
                                         `confusion_counts` template (`dvc plots diff`)
    plots/<model>/confusion.png          row-normalised confusion matrix
    plots/<model>/per_image.csv          image,labelled_pixels,pixel_accuracy,mean_iou
    plots/<model>/qualitative.png        image | ground truth | prediction, first val keys
    plots/<model>/worst.png, best.png    the same for the lowest and highest per-image mean IU
    metrics/tta/<model>.json             the same metrics with test-time augmentation, if on
    reports/summary.md                   FCN-32s vs 16s vs 8s in %, like the paper's Table 2
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.classes import NUM_CLASSES, VOC_CLASSES
from pipeline.evaluation.metrics import confusion_matrix, segmentation_scores
from pipeline.inference.predict import forward_labels, predict_labels
from pipeline.reports.visualize import confusion_png, qualitative_png

# Long, Shelhamer, Darrell, CVPR 2015, Table 2: the cascade on a subset of PASCAL VOC 2011 val
# (seg11valid), trained on SBD, in % (pixel acc., mean acc., mean IU, f.w. IU).
PAPER_TABLE2: dict[str, tuple[float, float, float, float]] = {
    "fcn32s": (89.1, 73.3, 59.4, 81.4),
    "fcn16s": (90.0, 75.7, 62.4, 83.0),
    "fcn8s": (90.3, 75.9, 62.7, 83.2),
}
VOC2012_VAL = "PASCAL VOC 2012 val"

METRIC_COLUMNS = (  # (key, the paper's column name)
    ("pixel_accuracy", "pixel acc."),
    ("mean_class_accuracy", "mean acc."),
    ("mean_iou", "mean IU"),
    ("fw_iou", "f.w. IU"),
)
# reported beside the paper's four: not in Table 2, so not in the comparison with it
EXTRA_COLUMNS = (("mean_dice", "mean Dice (F1)"),)
PER_IMAGE_FIELDS = ("image", "labelled_pixels", "pixel_accuracy", "mean_iou")


def display_name(name: str) -> str:
    """fcn32s -> FCN-32s, fcn8s_atonce -> FCN-8s at-once."""
    if name == "fcn8s_atonce":
        return "FCN-8s at-once"
    return f"FCN-{name[3:]}" if name.startswith("fcn") else name


def _resolve(device: str | torch.device, precision: str | torch.dtype | None):
    from pipeline.device import resolve_device, resolve_precision

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    amp = resolve_precision(precision, dev) if isinstance(precision, str) else precision
    return dev, amp


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# --- the val set -----------------------------------------------------------------------------


def val_datasets(val_dir: str | Path) -> tuple[Any, Any]:
    """(normalised dataset for scoring, raw uint8 dataset for pictures) over the val shards."""
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform

    return SegmentationShards(val_dir, transform=eval_transform()), SegmentationShards(val_dir)


def _key(dataset: Any, i: int) -> str:
    return dataset.key(i) if hasattr(dataset, "key") else f"{i:06d}"


# --- scoring ---------------------------------------------------------------------------------


def _identity(x):
    return x


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    device: str | torch.device = "auto",
    precision: str | torch.dtype | None = "auto",
    channels_last: bool = True,
    batch_size: int = 1,
    workers: int = 0,
    num_classes: int = NUM_CLASSES,
    progress: bool = True,
    desc: str = "evaluate",
    per_image: list[dict[str, Any]] | None = None,
) -> torch.Tensor:
    """The (C, C) int64 confusion matrix of `model` over `dataset` (normalised images, masks).

    Images are scored at their own size; up to `batch_size` consecutive images of equal size
    share a forward pass. The matrix is accumulated on `device` and returned on the CPU.
    The model is moved to `device` and put in eval mode. When `per_image` is a list, one
    `image_scores` row per image is appended to it, in dataset order, with its "index" and
    "image" key.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev, amp = _resolve(device, precision)
    _prepare(model, dev, channels_last)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # sizes differ: group by hand below
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        collate_fn=_identity,
    )
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        x = torch.stack([im for _, im, _ in pending]).to(dev, non_blocking=True)
        y = torch.stack([m for _, _, m in pending]).to(dev, non_blocking=True)
        pred = forward_labels(model, x, amp_dtype=amp, channels_last=channels_last)
        try:
            if per_image is None:
                hist.add_(confusion_matrix(pred, y, num_classes))
            else:  # one matrix per image: the sum is the same matrix, exactly (integers)
                for (i, _, _), p, t in zip(pending, pred, y, strict=True):
                    h = confusion_matrix(p, t, num_classes)
                    hist.add_(h)
                    per_image.append({"index": i, "image": _key(dataset, i), **image_scores(h)})
        except ValueError as e:  # name the records: a bad label map is a data problem
            keys = [_key(dataset, i) for i, _, _ in pending]
            raise ValueError(f"val record(s) {keys}: {e}") from None
        pending.clear()

    with tqdm(
        total=len(dataset), desc=desc, unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for i, (image, mask) in enumerate(loader):  # sequential: i is the dataset index
            if image.shape[-2:] != mask.shape[-2:]:
                raise ValueError(
                    f"val record {_key(dataset, i)!r}: image {tuple(image.shape)} and mask "
                    f"{tuple(mask.shape)} differ in size"
                )
            if pending and (image.shape != pending[0][1].shape or len(pending) == batch_size):
                flush()
            pending.append((i, torch.as_tensor(image), torch.as_tensor(mask)))
            bar.update(1)
        if pending:
            flush()
    return hist.cpu()


# --- reports ---------------------------------------------------------------------------------


def _json_safe(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def image_scores(hist: torch.Tensor) -> dict[str, Any]:
    """One image's labelled pixel count, pixel accuracy and mean IoU from its (C, C) int64
    confusion matrix (rows = ground truth). The mean is over the classes in the image's
    ground truth or prediction (`pipeline.evaluation.metrics`), so it ranks images for the worst/best
    sheets; a set's mean IU is *not* the mean of these (Long et al. sum the matrices first).
    An image with no labelled pixel gets None for both scores.
    """
    s = segmentation_scores(hist)
    return {
        "labelled_pixels": s["num_pixels"],
        "pixel_accuracy": _json_safe(s["pixel_accuracy"]),
        "mean_iou": _json_safe(s["mean_iou"]),
    }


def metrics_json(scores: Mapping[str, Any], class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """The DVC metrics file: the four metrics, mean Dice, then IoU and Dice per class by class
    name (null where the class is in neither ground truth nor prediction)."""
    out: dict[str, Any] = {
        key: _json_safe(scores[key]) for key, _ in (*METRIC_COLUMNS, *EXTRA_COLUMNS)
    }
    for key in ("per_class_iou", "per_class_dice"):
        out[key] = {name: _json_safe(v) for name, v in zip(class_names, scores[key], strict=True)}
    return out


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def per_class_iou_csv(scores: Mapping[str, Any], class_names: Sequence[str] = VOC_CLASSES) -> str:
    """class,iou,dice rows, one per class; an absent class has empty cells (CSV null)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "iou", "dice"])
    for name, iou, dice in zip(
        class_names, scores["per_class_iou"], scores["per_class_dice"], strict=True
    ):
        w.writerow([name, _cell(iou), _cell(dice)])
    return buf.getvalue()


def confusion_csv(hist: torch.Tensor | np.ndarray, class_names: Sequence[str] = VOC_CLASSES) -> str:
    """actual,predicted,count: every cell of the (C, C) matrix (rows = ground truth), zeros
    included, so two revisions' files have the same rows and `dvc plots diff` lines them up.

    DVC's built-in `confusion` template counts *rows* (one per pixel would be ~10^8 rows for
    VOC val); the project's `confusion_counts` template sums the `count` column instead.
    """
    h = np.asarray(hist.cpu() if isinstance(hist, torch.Tensor) else hist)
    if h.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {h.shape} does not match {len(class_names)} classes")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted", "count"])
    for i, actual in enumerate(class_names):
        for j, predicted in enumerate(class_names):
            w.writerow([actual, predicted, int(h[i, j])])
    return buf.getvalue()


def per_image_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """image,labelled_pixels,pixel_accuracy,mean_iou: one row per val image, by image key."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PER_IMAGE_FIELDS)
    for r in sorted(rows, key=lambda r: r["image"]):
        w.writerow(
            [r["image"], r["labelled_pixels"], _cell(r["pixel_accuracy"]), _cell(r["mean_iou"])]
        )
    return buf.getvalue()


def qualitative_indices(dataset: Any, n: int) -> list[int]:
    """The first `n` records of the val set by key order (fixed whatever the shard order)."""
    return sorted(range(len(dataset)), key=lambda i: _key(dataset, i))[:n]


def ranked_indices(rows: Sequence[Mapping[str, Any]], n: int) -> tuple[list[int], list[int]]:
    """Dataset indices of the `n` worst and the `n` best images by per-image mean IoU (ties:
    image key order); images without a labelled pixel are left out."""
    scored = sorted(
        (r for r in rows if r["mean_iou"] is not None), key=lambda r: (r["mean_iou"], r["image"])
    )
    worst = [r["index"] for r in scored[:n]]
    best = [r["index"] for r in sorted(scored, key=lambda r: (-r["mean_iou"], r["image"]))[:n]]
    return worst, best


def qualitative_samples(
    model: nn.Module,
    raw_dataset: Any,
    indices: Sequence[int],
    *,
    device: str | torch.device = "auto",
    precision: str | torch.dtype | None = "auto",
    channels_last: bool = True,
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(key, RGB image, ground truth, prediction) for the qualitative sheet."""
    dev, amp = _resolve(device, precision)
    _prepare(model, dev, channels_last)
    samples = []
    for i in indices:
        image, mask = raw_dataset[i]
        image = torch.as_tensor(image)
        pred = predict_labels(model, image[None], amp_dtype=amp, channels_last=channels_last)
        samples.append(
            (
                _key(raw_dataset, i),
                image.permute(1, 2, 0).numpy(),
                torch.as_tensor(mask).numpy(),
                pred[0].cpu().numpy(),
            )
        )
    return samples


def write_model_report(
    name: str,
    hist: torch.Tensor,
    model: nn.Module,
    dataset: Any,
    out_root: str | Path,
    qualitative_images: int,
    *,
    device: str | torch.device = "auto",
    precision: str | torch.dtype | None = "auto",
    channels_last: bool = True,
    class_names: Sequence[str] = VOC_CLASSES,
    per_image: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write metrics/<name>.json and plots/<name>/: per_class_iou.csv, confusion.csv,
    confusion.png, qualitative.png, and, given `per_image` rows (`evaluate_model`),
    per_image.csv, worst.png and best.png.

    `dataset` is the raw val set (uint8 images) the qualitative sheets are drawn from.
    Returns the scores.
    """
    out_root = Path(out_root)
    scores = segmentation_scores(hist)
    label = display_name(name)
    plots = out_root / "plots" / name

    def sheet(indices: Sequence[int], title: str) -> bytes:
        samples = qualitative_samples(
            model,
            dataset,
            indices,
            device=device,
            precision=precision,
            channels_last=channels_last,
        )
        return qualitative_png(samples, class_names, title)

    atomic_write_text(plots / "per_class_iou.csv", per_class_iou_csv(scores, class_names))
    atomic_write_text(plots / "confusion.csv", confusion_csv(hist, class_names))
    title = (
        f"{label}: mean IU {100 * scores['mean_iou']:.1f}%"
        if not math.isnan(scores["mean_iou"])
        else label
    )
    atomic_write_bytes(
        plots / "confusion.png", confusion_png(hist.cpu().numpy(), class_names, title)
    )
    atomic_write_bytes(
        plots / "qualitative.png", sheet(qualitative_indices(dataset, qualitative_images), label)
    )
    if per_image:
        atomic_write_text(plots / "per_image.csv", per_image_csv(per_image))
        worst, best = ranked_indices(per_image, qualitative_images)
        atomic_write_bytes(plots / "worst.png", sheet(worst, f"{label}: lowest image mean IU"))
        atomic_write_bytes(plots / "best.png", sheet(best, f"{label}: highest image mean IU"))
    atomic_write_json(out_root / "metrics" / f"{name}.json", metrics_json(scores, class_names))
    return scores


def _pct(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per model, the four metrics in % (the paper's Table 2 layout), then
    mean Dice (F1)."""
    columns = [*METRIC_COLUMNS, *EXTRA_COLUMNS]
    lines = [
        "| model | " + " | ".join(col for _, col in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, s in results.items():
        lines.append(
            f"| {display_name(name)} | " + " | ".join(_pct(s.get(k)) for k, _ in columns) + " |"
        )
    return "\n".join(lines) + "\n"


def per_class_table(
    results: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] = VOC_CLASSES,
    key: str = "per_class_iou",
) -> str:
    """Markdown: `key` (per-class IoU, or "per_class_dice") per class (rows) and model
    (columns) in %; n/a for absent classes."""
    lines = [
        "| class | " + " | ".join(display_name(n) for n in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for c, cname in enumerate(class_names):
        lines.append(f"| {cname} | " + " | ".join(_pct(s[key][c]) for s in results.values()) + " |")
    return "\n".join(lines) + "\n"


def paper_comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: the paper's Table 2 row beside this run's, per model, the four metrics in %."""
    cols = [col for _, col in METRIC_COLUMNS]
    lines = [
        "| model | " + " | ".join(f"{c} (paper)" + f" | {c} (this run)" for c in cols) + " |",
        "|---|" + "---:|" * (2 * len(cols)),
    ]
    for name, s in results.items():
        paper = PAPER_TABLE2.get(name)
        cells = []
        for i, (key, _) in enumerate(METRIC_COLUMNS):
            cells += [f"{paper[i]:.1f}" if paper else "n/a", _pct(s[key])]
        lines.append(f"| {display_name(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(
    results: Mapping[str, Mapping[str, Any]],
    *,
    num_images: int,
    setting: str = "",
    val_set: str = VOC2012_VAL,
    class_names: Sequence[str] = VOC_CLASSES,
) -> str:
    """reports/summary.md: this run's Table 2 on `val_set`, the paper's beside it, IoU per class.

    `val_set` names what was scored honestly (the sample's generated split is not VOC).
    """
    pixels = next(iter(results.values()))["num_pixels"] if results else 0
    cascade = " -> ".join(f"{display_name(n)} {_pct(s['mean_iou'])}" for n, s in results.items())
    return (
        f"# FCN-32s, FCN-16s, FCN-8s on {val_set}\n\n"
        f"{num_images} images at original resolution, {pixels:,} labelled "
        f"pixels (255 ignored){'; ' + setting if setting else ''}. Metrics as in Long et al., "
        "Table 2, in %.\n\n"
        + summary_table(results)
        + f"\nMean IU cascade of this run: {cascade}.\n"
        + "\n## Beside the paper's Table 2\n\n"
        "The paper's figures are FCN-32s/16s/8s trained on SBD and scored on a subset of PASCAL "
        "VOC 2011 val (Long, Shelhamer, Darrell, CVPR 2015, Table 2). They are the reference "
        "*shape* of the cascade (each stage above the last), not a number to compare with "
        f"unless this run scored the same images: it scored {val_set}.\n\n"
        + paper_comparison_table(results)
        + "\n## IoU per class (%)\n\nn/a: the class is in neither the ground truth nor the "
        "predictions of this val set, so it is left out of the mean.\n\n"
        + per_class_table(results, class_names)
        + "\n## Dice (F1) per class (%)\n\n2 TP / (2 TP + FP + FN) = 2 IU / (1 + IU): the same "
        "ranking as IU, on the scale segmentation reports outside VOC use.\n\n"
        + per_class_table(results, class_names, "per_class_dice")
    )


def evaluate_all(
    load_model: Callable[[str], nn.Module],
    names: Sequence[str],
    val_dir: str | Path,
    out_root: str | Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1,
    qualitative_images: int = 6,
    workers: int = 0,
    channels_last: bool = True,
    progress: bool = True,
    val_set: str = VOC2012_VAL,
    tta_flip: bool = False,
    tta_scales: Sequence[float] = (1.0,),
    split: str = "voc2012_val",
    train_dir: str | Path | None = None,
    allow_partial_split: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate each named model (loaded one at a time), write its report and reports/summary.md.

    `val_set` is the name the summary gives the scored images. With test-time augmentation
    (`tta_flip`, `tta_scales`: `pipeline.evaluation.tta`) each model is scored a second time through it,
    into metrics/tta/<name>.json and a table of its own; without, that file says "none".
    `split` ("voc2012_val" or "seg11valid", `pipeline.data.splits`) selects the scored records
    (`allow_partial_split`: the seg11valid images present, however few); with `train_dir`, scoring an image that is also in the training shards is refused.

    Raises:
        ValueError: empty val set, unknown split, seg11valid ids missing from the val shards,
            or val images that are also training images.
    """
    from pipeline.evaluation.tta import TestTimeAugmentation, tta_enabled, tta_name

    out_root = Path(out_root)
    from pipeline.data.shards import ShardReader
    from pipeline.data.splits import check_no_overlap, select_split

    eval_set, raw_set = (select_split(d, split, allow_partial_split) for d in val_datasets(val_dir))
    if len(eval_set) == 0:
        raise ValueError(f"{val_dir}: the val set is empty")
    if train_dir is not None:
        train_keys = [r["key"] for r in ShardReader(train_dir).records]
        check_no_overlap(train_keys, [eval_set.key(i) for i in range(len(eval_set))], split)
    dev, amp = _resolve(device, precision)
    results: dict[str, dict[str, Any]] = {}
    tta_results: dict[str, dict[str, Any]] = {}
    score = functools.partial(
        evaluate_model,
        dataset=eval_set,
        device=dev,
        precision=amp,
        channels_last=channels_last,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    for name in names:
        model = load_model(name)
        per_image: list[dict[str, Any]] = []
        hist = score(model, desc=f"evaluate {name}", per_image=per_image)
        results[name] = write_model_report(
            name,
            hist,
            model,
            raw_set,
            out_root,
            qualitative_images,
            device=dev,
            precision=amp,
            channels_last=channels_last,
            per_image=per_image,
        )
        s = results[name]
        print(
            f"[evaluate] {name}: mean IU {_pct(s['mean_iou'])}%, pixel acc. "
            f"{_pct(s['pixel_accuracy'])}%",
            flush=True,
        )
        tta = {"tta": tta_name(tta_flip, tta_scales)}
        if tta_enabled(tta_flip, tta_scales):
            hist_tta = score(
                TestTimeAugmentation(model, flip=tta_flip, scales=tta_scales),
                desc=f"evaluate {name} + TTA",
            )
            tta_results[name] = segmentation_scores(hist_tta)
            tta.update(metrics_json(tta_results[name]))
        atomic_write_json(out_root / "metrics" / "tta" / f"{name}.json", tta)
        del model
    setting = f"device {dev.type}, precision {str(amp).replace('torch.', '') if amp else 'fp32'}"
    md = summary_markdown(results, num_images=len(eval_set), setting=setting, val_set=val_set)
    if tta_results:
        md += (
            f"\n## With test-time augmentation ({tta_name(tta_flip, tta_scales)})\n\n"
            "Class probabilities averaged over the augmented views (`pipeline/evaluation/tta.py`); the "
            "paper scores single views, so these are not for comparison with Table 2.\n\n"
            + summary_table(tta_results)
        )
    atomic_write_text(out_root / "reports" / "summary.md", md)
    print("\n" + summary_table(results), flush=True)
    return results
