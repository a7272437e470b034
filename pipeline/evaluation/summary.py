"""What the evaluate stage writes, formatted from the scores: the DVC metrics file (the headline
numbers), the CSVs behind the plots and reports/summary.md, this run's version of the paper's
Table 2.

The four metrics and their column names are those of Long, Shelhamer, Darrell, *Fully
Convolutional Networks for Semantic Segmentation* (CVPR 2015 / PAMI 2016), section 5 and
Table 2; mean Dice (F1) is reported beside them. Scores are fractions in [0, 1] everywhere;
the markdown tables show them in %. The model card (`pipeline.reports.model_card`) uses the
same column names and display names.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.classes import VOC_CLASSES
from pipeline.data.settings import DownloadConfig, download_config
from pipeline.evaluation.score import json_safe
from pipeline.evaluation.settings import EvaluateConfig, evaluate_config

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


def val_set_name(evaluate: EvaluateConfig, download: DownloadConfig) -> str:
    """What the val shards hold, said plainly (the sample's split is generated, not VOC): the
    name reports/summary.md and the model cards give the scored images, from the active
    profile's `evaluate` section (split, allow_partial_split) and `download` section
    (generate_sample, sample.voc_val)."""
    if evaluate.split == "seg11valid":
        if evaluate.allow_partial_split:
            return (
                "the seg11valid images present in the val shards (a subset of the 736: "
                "not comparable with the paper's figures)"
            )
        return "seg11valid (736 images of PASCAL VOC 2011 val, none in SBD train)"
    if download.generate_sample:
        n = download.sample.voc_val
        return f"the generated sample's val split ({n} synthetic images in VOC 2012's layout)"
    return VOC2012_VAL


def scored_set_name(cfg: Mapping[str, Any]) -> str:
    """`val_set_name` of the active profile `cfg` (`pipeline.config.load_params`): what the
    evaluate stage, the model cards and `fcn-import-caffe --evaluate` call the scored images.

    Raises:
        ParamsError: the evaluate or download section does not validate.
    """
    return val_set_name(evaluate_config(cfg), download_config(cfg))


def metrics_json(scores: Mapping[str, Any]) -> dict[str, float | None]:
    """The DVC metrics file metrics/<model>.json: the four Table 2 metrics and mean Dice, flat,
    fractions in [0, 1] (None, JSON null, where undefined: an empty val set). The headline
    numbers only, so that `dvc metrics show` / `dvc exp show` stay a few columns wide; IoU and
    Dice per class are in `per_class_iou_csv` (plots/<model>/per_class_iou.csv)."""
    return {key: json_safe(scores[key]) for key, _ in (*METRIC_COLUMNS, *EXTRA_COLUMNS)}


def per_class_json(
    scores: Mapping[str, Any], class_names: Sequence[str] = VOC_CLASSES
) -> dict[str, dict[str, float | None]]:
    """{"per_class_iou": {class: v}, "per_class_dice": {class: v}}: fractions in [0, 1] by
    class name, null where the class is in neither ground truth nor prediction. For plain
    reports (the test-time augmentation report), not for DVC metrics.

    Raises:
        ValueError: `class_names` and the per-class lists of `scores` differ in length.
    """
    return {
        key: {name: json_safe(v) for name, v in zip(class_names, scores[key], strict=True)}
        for key in ("per_class_iou", "per_class_dice")
    }


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


def percent(v: float | None) -> str:
    """A fraction as a % with one decimal; "n/a" for None or NaN (an absent class)."""
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
            f"| {display_name(name)} | " + " | ".join(percent(s.get(k)) for k, _ in columns) + " |"
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
        lines.append(
            f"| {cname} | " + " | ".join(percent(s[key][c]) for s in results.values()) + " |"
        )
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
            cells += [f"{paper[i]:.1f}" if paper else "n/a", percent(s[key])]
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
    cascade = " -> ".join(f"{display_name(n)} {percent(s['mean_iou'])}" for n, s in results.items())
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
