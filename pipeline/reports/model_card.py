"""Model cards: one markdown page per trained model, reports/model_cards/<name>.md.

What a user needs before using a model, from what the pipeline already knows: the recipe (the
active params profile), the data (the val set named honestly: the sample profile's is
generated, not VOC), the evaluation metrics (metrics/<name>.json of the `evaluate` stage), the
inference figures (`pipeline.inference.speed.benchmark_model`), intended use and limits. Written by
the DVC stage `inference_report`, which has the inference figures at hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.settings import (
    DownloadConfig,
    PreprocessConfig,
    download_config,
    preprocess_config,
)
from pipeline.evaluation.summary import EXTRA_COLUMNS, METRIC_COLUMNS, display_name, percent
from pipeline.inference.settings import InferenceConfig
from pipeline.training.recipe import (
    ModelConfig,
    StageRecipe,
    TrainConfig,
    model_config,
    train_config,
)


@dataclass(frozen=True)
class CardRecipe:
    """What a model card states about the run: the profile's name and the typed sections of
    the recipe and the data (`card_recipe` builds it from the active profile)."""

    profile: str
    train: TrainConfig
    model: ModelConfig
    download: DownloadConfig
    preprocess: PreprocessConfig


def card_recipe(cfg: Mapping[str, Any]) -> CardRecipe:
    """The `CardRecipe` of the active profile `cfg` (`pipeline.config.load_params`).

    Raises:
        ParamsError: a section does not validate.
    """
    return CardRecipe(
        cfg["profile"], train_config(cfg), model_config(cfg), download_config(cfg),
        preprocess_config(cfg),
    )  # fmt: skip


ARCH_NOTES = {
    "fcn32s": "one stream: the stride-32 scores upsampled 32x (fixed bilinear)",
    "fcn16s": "stride-32 scores upsampled 2x and fused with the pool4 scores, then 16x",
    "fcn8s": "FCN-16s's fusion upsampled 2x and fused with the pool3 scores, then 8x",
    "fcn8s_atonce": "FCN-8s's net with pool4 scaled by 0.01 and pool3 by 0.0001 before their "
    "scores (fixed), trained at once from VGG16",
}


def initialisation(name: str, recipe: CardRecipe) -> str:
    """Where the model's training started, in words."""
    prev = recipe.train.stages[name].initialised_from
    if prev is not None:
        return f"{display_name(prev)} (models/{prev}.pt), new layers zero-initialised"
    if recipe.model.backbone_init == "random":
        return "random weights (no pretrained backbone)"
    if recipe.download.generate_sample:
        return (
            "the sample's stand-in VGG16 classifier (stage download_vgg16: a width-reduced VGG16 "
            "trained on crops of the generated sample, not ImageNet)"
        )
    if recipe.download.vgg16.format == "caffe":
        return (
            "the Caffe model zoo's ImageNet VGG16 (VGG_ILSVRC_16_layers, the FCN release's), "
            "fc6/fc7 reshaped to convolutions; input BGR 0..255 minus the mean"
        )
    return "torchvision's ImageNet VGG16 (vgg16-397923af.pth), fc6/fc7 reshaped to convolutions"


def budget(stage: StageRecipe) -> tuple[str, str]:
    """The (setting, value) row of a stage's training length: its `max_iter` when set, else
    its epochs (`pipeline.training.solver.iteration_budget`)."""
    if stage.max_iter is not None:
        return "iterations", f"{stage.max_iter} (max_iter; epochs derived from it)"
    return "epochs", str(stage.epochs)


def upsampling(name: str, learned: bool) -> str:
    """How `name` upsamples its scores, as `train.learn_upsampling` trained it: the final
    upsampling is fixed bilinear in every net; the 2x ones of FCN-16s/8s learn (the paper's
    text) or stay bilinear (the release: `lr_mult: 0` on every Deconvolution)."""
    if name == "fcn32s":
        return "bilinear 32x, fixed"
    if learned:
        return "2x layers learned from bilinear (the paper's text), final one fixed bilinear"
    return "every layer fixed at bilinear (the release's lr_mult 0)"


def recipe_table(name: str, recipe: CardRecipe) -> str:
    """Markdown: the training settings of `name` from the active params profile."""
    t, m, stage = recipe.train, recipe.model, recipe.train.stages[name]
    batch = t.batch_size * t.accumulate * t.processes
    rows = [
        ("initialised from", initialisation(name, recipe)),
        ("VGG16 width multiplier", f"{m.width:g}"),
        ("dropout after fc6/fc7", f"{m.dropout:g}"),
        budget(stage),
        ("learning rate", f"{stage.lr:g} ({t.lr_policy} policy)"),
        (
            "batch",
            f"{batch} images per step ({t.batch_size} per process x {t.accumulate} "
            f"accumulated x {t.processes} processes)",
        ),
        ("loss", f"cross-entropy, {t.loss} over pixels, 255 ignored"),
        ("optimiser", f"SGD, momentum {t.momentum:g}, weight decay {t.weight_decay:g}"),
        ("upsampling", upsampling(name, t.learn_upsampling)),
        ("crops", f"{t.crop_size} px, scale {list(t.scale_range)}, hflip {t.hflip}"),
        ("precision", t.precision),
    ]
    return "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown: the four Table 2 metrics and mean Dice (when present) in %."""
    cols = [(k, c) for k, c in (*METRIC_COLUMNS, *EXTRA_COLUMNS) if k in metrics]
    return (
        "| " + " | ".join(c for _, c in cols) + " |\n"
        "|" + "---:|" * len(cols) + "\n"
        "| " + " | ".join(percent(metrics[k]) for k, _ in cols) + " |\n"
    )


def inference_table(report: Mapping[str, Any]) -> str:
    """Markdown: img/s and p50/p95 latency per input setting of a `benchmark_model` report."""
    lines = ["| input | images/s | p50 ms | p95 ms |", "|---|---:|---:|---:|"]
    for key, value in report.items():
        if key.startswith("at_") and isinstance(value, Mapping):
            label = (
                f"val images ({value['images']}; {value['sizes']})"
                if key == "at_val_sizes"
                else key[3:]
            )
            lines.append(
                f"| {label} | {value['images_per_s']:.2f} | {value['latency_p50_ms']:.1f} | "
                f"{value['latency_p95_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def model_section(name: str, recipe: CardRecipe, inference: Mapping[str, Any]) -> str:
    """Markdown bullets: the architecture, its size and cost (`benchmark_model`'s parameters
    and GFLOPs), its input and output tensors and its files."""
    label = display_name(name)
    gflops = next((v for k, v in inference.items() if k.startswith("gflops_")), None)
    gflops_at = next((k[7:] for k in inference if k.startswith("gflops_")), "")
    return (
        f"- {label}, fully convolutional network on a VGG16 backbone (Long, Shelhamer, Darrell, "
        f"CVPR 2015): {ARCH_NOTES.get(recipe.train.stages[name].architecture, '')}.\n"
        f"- {inference['parameters']:,} parameters"
        + (f"; {gflops:.2f} GFLOPs per {gflops_at} image" if gflops is not None else "")
        + " (FlopCounterMode, a multiply-add = 2 FLOPs).\n"
        "- Input `[N, 3, H, W]` float32, any H and W: RGB in 0..1 normalised with the ImageNet "
        "mean/std. Output: logits `[N, 21, H, W]`; argmax over dim 1 is the label map.\n"
        f"- Files: `models/{name}.pt` (`pipeline.models.fcn.load_model`), "
        f"`models/onnx/{name}.onnx` (stage `export_onnx`, dynamic H and W).\n"
    )


def training_data(recipe: CardRecipe) -> str:
    """What the model was trained on, in words, from the active params profile."""
    if recipe.download.generate_sample:
        return (
            "the generated sample's train split and its generated COCO-style images (synthetic "
            "shapes in VOC 2012's and COCO's layouts, pipeline/data/sample.py)"
        )
    coco = " + COCO 2017 instances of the 20 VOC classes" if recipe.preprocess.use_coco else ""
    return "PASCAL VOC 2012 train" + coco


def inference_section(name: str, inference: Mapping[str, Any]) -> str:
    """Markdown: how the figures were measured, `inference_table`, the peak memory."""
    mem = inference.get("peak_memory_mib")
    return (
        f"{inference['device']}, {inference['precision']}, batch {inference.get('batch_size', 1)}"
        f", after {inference['warmup']} warm-up pass(es), {inference['repeats']} timed "
        f"repeat(s). Machine: {inference['machine']}.\n\n"
        + inference_table(inference)
        + (
            f"\nPeak memory of one pass: {mem:.1f} MiB ({inference['peak_memory_method']}).\n"
            if mem is not None
            else ""
        )
        + f"Figures vary between runs and machines: reports/inference/{name}.json holds them; "
        "`dvc metrics diff` compares the images/s at 500x500 of two commits "
        "(metrics/inference.json).\n"
    )


def use_and_limits(sample: bool) -> str:
    """Markdown: the intended use and the limits sections; `sample`: trained on the generated
    sample (a smoke test, said first)."""
    limits = [
        "21 classes only (background + the 20 PASCAL VOC classes); anything else is background "
        "or a wrong VOC class.",
        "Semantic, not instance segmentation: touching objects of one class merge.",
        "Thin structures and small objects suffer from the stride-8/16/32 decoder (FCN-8s least).",
        "Inputs: RGB scaled to 0..1 and normalised with the ImageNet mean/std; other "
        "normalisations give wrong labels without an error.",
    ]
    if sample:
        limits.insert(
            0,
            "**Trained and scored on generated data (the sample profile)**: it demonstrates the "
            "pipeline and says nothing about real photos. Use the full profile for a real model.",
        )
    intended = (
        "A smoke-test model: checking the pipeline, the export and deployment plumbing end to end."
        if sample
        else "Semantic segmentation of photos into the 20 PASCAL VOC classes, as in Long et al.; "
        "a baseline to compare newer segmentation models against."
    )
    return (
        "## Intended use\n\n"
        + intended
        + "\n\n## Limits\n\n"
        + "".join(f"- {item}\n" for item in limits)
    )


def model_card(
    name: str,
    recipe: CardRecipe,
    metrics: Mapping[str, Any],
    inference: Mapping[str, Any],
    val_set: str,
) -> str:
    """The markdown model card of `name`.

    `recipe`: the run's settings (`card_recipe`); `metrics`: the dict of
    metrics/<name>.json (fractions in [0, 1], shown in %); `inference`: `benchmark_model`'s
    report; `val_set`: what the metrics were scored on, in words
    (`pipeline.evaluation.summary.val_set_name`).
    """
    return (
        f"# Model card: {display_name(name)}\n\n"
        f"Generated by the DVC stage `inference_report` (profile `{recipe.profile}`) from "
        f"params.yaml, metrics/{name}.json and models/{name}.pt; do not edit by hand.\n\n"
        "## Model\n\n" + model_section(name, recipe, inference) + "\n"
        "## Training recipe\n\n" + recipe_table(name, recipe) + "\n"
        "## Data\n\n"
        f"- Profile: `{recipe.profile}`.\n"
        f"- Trained on: {training_data(recipe)}.\n"
        f"- Evaluated on: {val_set}, each image at its original resolution.\n\n"
        f"## Metrics in % on {val_set}\n\n"
        + metrics_table(metrics)
        + "\nAs in Long et al., Table 2: the confusion matrix summed over the val set, then the "
        "metrics; mean IU averages the classes present in ground truth or prediction.\n\n"
        "## Inference\n\n"
        + inference_section(name, inference)
        + "\n"
        + use_and_limits(recipe.download.generate_sample)
    )


def write_inference_reports(
    recipe: CardRecipe,
    timing: InferenceConfig,
    device: str,
    val_set: str,
    names: Sequence[str],
    *,
    models_dir: str | Path = "models",
    val_dir: str | Path = "data/preprocessed/val",
    out_root: str | Path = ".",
) -> None:
    """The inference_report stage's work, per model of `names`: `benchmark_model` on `device`
    (warm-up, repeats and val images from `timing`, the `inference` section) into
    out_root/reports/inference/<name>.json, and its model card (`recipe`; from
    out_root/metrics/<name>.json, the evaluate stage's, scored on `val_set`, in words) into
    out_root/reports/model_cards/<name>.md; then the DVC metrics of the models of `names`,
    their images/s at 500x500 (`speed_metrics`), into out_root/metrics/inference.json.

    Raises:
        FileNotFoundError: a model file, metrics file or the val shards are missing (the stage
            checks them first).
    """
    from pipeline.atomic import atomic_write_json, atomic_write_text
    from pipeline.inference.speed import benchmark_model, load_val_images, speed_metrics
    from pipeline.models.fcn import load_model

    out = Path(out_root)
    images, _ = load_val_images(val_dir, timing.val_images)
    reports: dict[str, dict[str, Any]] = {}
    for name in names:
        model = load_model(Path(models_dir) / f"{name}.pt", map_location="cpu")
        report = benchmark_model(
            model, images, device=device, warmup=timing.warmup, repeats=timing.repeats
        )
        metrics = json.loads((out / "metrics" / f"{name}.json").read_text())
        reports[name] = report
        atomic_write_json(out / "reports" / "inference" / f"{name}.json", report)
        card = model_card(name, recipe, metrics, report, val_set)
        atomic_write_text(out / "reports" / "model_cards" / f"{name}.md", card)
        at = report["at_500x500"]
        print(
            f"[inference] {name}: {at['images_per_s']:.2f} img/s at 500x500, p50 "
            f"{at['latency_p50_ms']:.1f} ms, p95 {at['latency_p95_ms']:.1f} ms "
            f"({report['machine']})",
            flush=True,
        )
    atomic_write_json(out / "metrics" / "inference.json", speed_metrics(reports))
