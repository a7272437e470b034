"""Score FCN-32s/16s/8s on VOC 2012 val at original resolution, as the paper's Table 2 does.

Each model runs on every val image at its original size (batch 1 unless consecutive images
share a size), one confusion matrix is accumulated over the whole set on the model's device
(`pipeline.evaluation.score`), and the four metrics come from it (`pipeline.evaluation.metrics`;
formatted by `pipeline.evaluation.summary`). Outputs, all written atomically:

    metrics/<model>.json                 DVC metrics, the headline numbers only: the four
                                         metrics and mean Dice (F1), flat
    plots/<model>/per_class_iou.csv      class,iou,dice (one row per class; a bar chart)
    plots/<model>/confusion.csv          actual,predicted,count: all C x C cells, for the
                                         `confusion_counts` template (`dvc plots diff`)
    plots/<model>/confusion.png          row-normalised confusion matrix
    plots/<model>/per_image.csv          image,labelled_pixels,pixel_accuracy,mean_iou
    plots/<model>/qualitative.png        image | ground truth | prediction, first val keys
    plots/<model>/worst.png, best.png    the same for the lowest and highest per-image mean IU
    reports/tta/<model>.json             the same metrics, and IoU and Dice per class, with
                                         test-time augmentation, if on ({"tta": "none"} if off)
    reports/summary.md                   FCN-32s vs 16s vs 8s in %, like the paper's Table 2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.classes import VOC_CLASSES
from pipeline.evaluation.metrics import segmentation_scores
from pipeline.evaluation.score import evaluate_model, prepare_model, record_key, resolve_runtime
from pipeline.evaluation.settings import EvaluateConfig
from pipeline.evaluation.summary import (
    VOC2012_VAL,
    confusion_csv,
    display_name,
    metrics_json,
    per_class_iou_csv,
    per_class_json,
    per_image_csv,
    percent,
    summary_markdown,
    summary_table,
)
from pipeline.inference.predict import predict_labels
from pipeline.inputs import require_inputs
from pipeline.visualize import confusion_png, qualitative_png


@dataclass(frozen=True)
class RunSettings:
    """How every model runs: `device` ("auto", "cpu", "cuda:0" or a torch.device), autocast
    `precision` ("auto", "fp32", "bf16", "fp16" or a dtype; None: fp32), up to `batch_size`
    same-size images per forward pass, `workers` decoding processes, channels-last layout,
    progress bars."""

    device: str | torch.device = "auto"
    precision: str | torch.dtype | None = "auto"
    batch_size: int = 1
    workers: int = 0
    channels_last: bool = True
    progress: bool = True

    def resolved(self) -> RunSettings:
        """The same settings with device and precision resolved once (`resolve_runtime`)."""
        dev, amp = resolve_runtime(self.device, self.precision)
        return replace(self, device=dev, precision=amp)


@dataclass(frozen=True)
class ValSet:
    """The scored images: the val shard dir, the `split` of it (`pipeline.data.splits`:
    "voc2012_val" or "seg11valid"; `allow_partial_split`: the seg11valid images present,
    however few), the training shards an image must not be in (None: not checked), and the
    `name` reports/summary.md gives the set."""

    val_dir: str | Path
    split: str = "voc2012_val"
    allow_partial_split: bool = False
    train_dir: str | Path | None = None
    name: str = VOC2012_VAL


@dataclass(frozen=True)
class ReportSettings:
    """What is reported beyond the metrics: `qualitative_images` per sheet, and test-time
    augmentation (`pipeline.evaluation.tta`: horizontal flip, `tta_scales` factors)."""

    qualitative_images: int = 6
    tta_flip: bool = False
    tta_scales: Sequence[float] = (1.0,)


# --- the val set -----------------------------------------------------------------------------


def val_datasets(val_dir: str | Path) -> tuple[Any, Any]:
    """(normalised dataset for scoring, raw uint8 dataset for pictures) over the val shards."""
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform

    return SegmentationShards(val_dir, transform=eval_transform()), SegmentationShards(val_dir)


# --- per-model report ---------------------------------------------------------------------------------


def qualitative_indices(dataset: Any, n: int) -> list[int]:
    """The first `n` records of the val set by key order (fixed whatever the shard order)."""
    return sorted(range(len(dataset)), key=lambda i: record_key(dataset, i))[:n]


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
    """(key, RGB image uint8 [H, W, 3], ground truth uint8 [H, W], prediction uint8 [H, W]) for
    each of `indices` of `raw_dataset` (uint8 images), for the qualitative sheets."""
    dev, amp = resolve_runtime(device, precision)
    prepare_model(model, dev, channels_last)
    samples = []
    for i in indices:
        image, mask = raw_dataset[i]
        image = torch.as_tensor(image)
        pred = predict_labels(model, image[None], amp_dtype=amp, channels_last=channels_last)
        samples.append(
            (
                record_key(raw_dataset, i),
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
    run: RunSettings = RunSettings(),
    class_names: Sequence[str] = VOC_CLASSES,
    per_image: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write metrics/<name>.json (the headline numbers, `metrics_json`) and plots/<name>/:
    per_class_iou.csv (IoU and Dice per class), confusion.csv,
    confusion.png, qualitative.png, and, given `per_image` rows (`evaluate_model`),
    per_image.csv, worst.png and best.png.

    `hist` is the set's (C, C) int64 confusion matrix; `dataset` is the raw val set (uint8
    images) the qualitative sheets are drawn from. Returns `segmentation_scores(hist)`.
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
            device=run.device,
            precision=run.precision,
            channels_last=run.channels_last,
        )
        return qualitative_png(samples, class_names, title)

    atomic_write_text(plots / "per_class_iou.csv", per_class_iou_csv(scores, class_names))
    atomic_write_text(plots / "confusion.csv", confusion_csv(hist, class_names))
    title = (
        label
        if math.isnan(scores["mean_iou"])
        else f"{label}: mean IU {percent(scores['mean_iou'])}%"
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
    atomic_write_json(out_root / "metrics" / f"{name}.json", metrics_json(scores))
    return scores


# --- the whole evaluation --------------------------------------------------------------------


def load_val_set(val: ValSet) -> tuple[Any, Any]:
    """(normalised dataset for scoring, raw uint8 dataset for pictures) of `val`'s split.

    Raises:
        ValueError: empty val set, unknown split, seg11valid ids missing from the val shards,
            or val images that are also training images.
    """
    from pipeline.data.shards import ShardReader
    from pipeline.data.splits import check_no_overlap, select_split

    datasets = val_datasets(val.val_dir)
    eval_set, raw_set = (select_split(d, val.split, val.allow_partial_split) for d in datasets)
    if len(eval_set) == 0:
        raise ValueError(f"{val.val_dir}: the val set is empty")
    if val.train_dir is not None:
        train_keys = [r["key"] for r in ShardReader(val.train_dir).records]
        val_keys = [eval_set.key(i) for i in range(len(eval_set))]
        check_no_overlap(train_keys, val_keys, val.split)
    return eval_set, raw_set


def _score(model: nn.Module, eval_set: Any, run: RunSettings, **kw: Any) -> torch.Tensor:
    return evaluate_model(
        model,
        eval_set,
        device=run.device,
        precision=run.precision,
        channels_last=run.channels_last,
        batch_size=run.batch_size,
        workers=run.workers,
        progress=run.progress,
        **kw,
    )


def score_and_report(
    name: str,
    model: nn.Module,
    datasets: tuple[Any, Any],
    out_root: Path,
    run: RunSettings,
    report: ReportSettings,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Score one model on (eval set, raw set), write its report and reports/tta/<name>.json;
    returns (its scores, its scores with test-time augmentation or None when that is off)."""
    from pipeline.evaluation.tta import TestTimeAugmentation, tta_enabled, tta_name

    eval_set, raw_set = datasets
    per_image: list[dict[str, Any]] = []
    hist = _score(model, eval_set, run, desc=f"evaluate {name}", per_image=per_image)
    scores = write_model_report(
        name,
        hist,
        model,
        raw_set,
        out_root,
        report.qualitative_images,
        run=run,
        per_image=per_image,
    )
    print(
        f"[evaluate] {name}: mean IU {percent(scores['mean_iou'])}%, pixel acc. "
        f"{percent(scores['pixel_accuracy'])}%",
        flush=True,
    )
    tta_json: dict[str, Any] = {"tta": tta_name(report.tta_flip, report.tta_scales)}
    tta_scores = None
    if tta_enabled(report.tta_flip, report.tta_scales):
        tta_model = TestTimeAugmentation(model, flip=report.tta_flip, scales=report.tta_scales)
        tta_scores = segmentation_scores(
            _score(tta_model, eval_set, run, desc=f"evaluate {name} + TTA")
        )
        tta_json.update(metrics_json(tta_scores))
        tta_json.update(per_class_json(tta_scores))
    atomic_write_json(out_root / "reports" / "tta" / f"{name}.json", tta_json)
    return scores, tta_scores


def write_summary(
    results: Mapping[str, Mapping[str, Any]],
    tta_results: Mapping[str, Mapping[str, Any]],
    num_images: int,
    out_root: Path,
    run: RunSettings,
    val_name: str,
    report: ReportSettings,
) -> None:
    """reports/summary.md (`summary_markdown`, plus a table with test-time augmentation when
    `tta_results` is not empty); the Table 2 rows are printed too. `run` is resolved."""
    from pipeline.evaluation.tta import tta_name

    amp = run.precision
    setting = (
        f"device {run.device.type}, precision {str(amp).replace('torch.', '') if amp else 'fp32'}"
    )
    md = summary_markdown(results, num_images=num_images, setting=setting, val_set=val_name)
    if tta_results:
        md += (
            f"\n## With test-time augmentation ({tta_name(report.tta_flip, report.tta_scales)})\n\n"
            "Class probabilities averaged over the augmented views (`pipeline/evaluation/tta.py`); "
            "the paper scores single views, so these are not for comparison with Table 2.\n\n"
            + summary_table(tta_results)
        )
    atomic_write_text(out_root / "reports" / "summary.md", md)
    print("\n" + summary_table(results), flush=True)


def evaluate_all(
    load_model: Callable[[str], nn.Module],
    names: Sequence[str],
    val: ValSet,
    out_root: str | Path,
    run: RunSettings = RunSettings(),
    report: ReportSettings = ReportSettings(),
) -> dict[str, dict[str, Any]]:
    """Evaluate each named model (loaded one at a time by `load_model(name)`), write its
    report (`write_model_report`, reports/tta/<name>.json) and reports/summary.md; returns
    the scores (`segmentation_scores`) by model name.

    Raises:
        ValueError: from `load_val_set`, before anything is written.
    """
    out_root = Path(out_root)
    datasets = load_val_set(val)
    run = run.resolved()
    results: dict[str, dict[str, Any]] = {}
    tta_results: dict[str, dict[str, Any]] = {}
    for name in names:
        scores, tta_scores = score_and_report(
            name, load_model(name), datasets, out_root, run, report
        )
        results[name] = scores
        if tta_scores is not None:
            tta_results[name] = tta_scores
    write_summary(results, tta_results, len(datasets[0]), out_root, run, val.name, report)
    return results


def evaluate_models(
    cfg: EvaluateConfig,
    val_name: str,
    names: Sequence[str],
    *,
    models_dir: str | Path = "models",
    val_dir: str | Path = "data/preprocessed/val",
    out_root: str | Path = ".",
    workers: int = 2,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """The evaluate stage's work: score models_dir/<name>.pt for each of `names` on the val
    shards as the `evaluate` section `cfg` says, writing under `out_root`; `val_name`: what
    the val shards hold, in words (`pipeline.evaluation.summary.val_set_name`).

    The training shards beside the val shards (`<val_dir>/../train`), when there, are checked
    for overlap: scoring an image trained on is refused.

    Raises:
        MissingInputsError: a model file or the val shards are missing (checked first, before
            an hour of scoring).
        ValueError: from `evaluate_all`.
    """
    from pipeline.models.fcn import load_model

    models, val_dir = Path(models_dir), Path(val_dir)
    require_inputs(
        {
            **{models / f"{n}.pt": (f"train_{n}", "model file") for n in names},
            val_dir / "index.json": ("preprocess", "val shards"),
        }
    )
    train_dir: Path | None = val_dir.parent / "train"
    if not (train_dir / "index.json").is_file():
        print(f"[evaluate] no training shards in {train_dir}: train/val overlap not checked")
        train_dir = None
    val = ValSet(val_dir, cfg.split, cfg.allow_partial_split, train_dir, val_name)
    run = RunSettings(cfg.device, cfg.precision, cfg.batch_size, workers, True, progress)
    report = ReportSettings(cfg.qualitative_images, cfg.tta.flip, cfg.tta.scales)
    return evaluate_all(
        lambda name: load_model(models / f"{name}.pt", map_location="cpu"),
        names,
        val,
        out_root,
        run,
        report,
    )
