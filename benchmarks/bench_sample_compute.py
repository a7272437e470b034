"""What the sample's trainings cost in arithmetic, and how fast this machine does it.

For each training of a params profile (default: the sample) - `download_vgg16`'s classification
pretraining, then FCN-32s, FCN-16s and FCN-8s - this counts the FLOPs of one step's forward
and backward pass (`torch.utils.flop_counter`, at the params' batch and input size; the SGD
update, a few MFLOP, is left out), times that pass (fp32, channels_last, median of `--steps`),
and multiplies both by the number of steps the params give
(`pipeline.training.solver.iteration_budget`). The same run measures the
machine's fp32 matrix-multiply rate (1024 x 1024 sgemm), the ceiling for this convolution-heavy
work: the trainings' FLOPs at that rate are a floor on their time that no implementation on
this machine gets far below. Validation passes, data stages and dvc come on top.

The FCN stages' steps per epoch come from the preprocessed training set in
`data/preprocessed/train` when it is there (after `dvc repro preprocess`), else from
`--train-images`, else from the sample's image counts (an upper bound: COCO images without a
VOC object are dropped).

    python benchmarks/bench_sample_compute.py            # the sample profile
    python benchmarks/bench_sample_compute.py --quick    # seconds: the script still runs
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# this checkout's `pipeline`, whichever project an installed copy points at
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine_line  # noqa: E402  (benchmarks/machine.py)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.classes import NUM_CLASSES  # noqa: E402
from pipeline.config import CASCADE, architecture  # noqa: E402
from pipeline.models.fcn import build_model  # noqa: E402
from pipeline.profiles import compose_profile  # noqa: E402
from pipeline.training.pretrain import CROP_SIZE, vgg16_bn_classifier  # noqa: E402
from pipeline.training.recipe import train_config  # noqa: E402
from pipeline.training.solver import iteration_budget, summed_loss  # noqa: E402


def median_seconds(fn: Callable[[], None], steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_cost(model: torch.nn.Module, x: torch.Tensor, loss: Callable, steps: int, warmup: int):
    """(GFLOP, seconds) of one forward + backward of `model` on `x`."""
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(x)).backward()

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9, median_seconds(step, steps, warmup)


def sgemm_gflops(steps: int) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_seconds(lambda: a @ b, max(steps, 5) * 3) / 1e9


def train_images(cfg: dict, given: int | None) -> tuple[int, str]:
    index = REPO / "data" / "preprocessed" / "train"
    if given is not None:
        return given, "--train-images"
    if index.is_dir():
        from pipeline.data.datasets import SegmentationShards

        return len(SegmentationShards(index)), str(index.relative_to(REPO))
    s = cfg["download"]["sample"]
    return s["voc_train"] + s["coco_train"] + s["coco_val"], "the sample's counts (upper bound)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per model (median)")
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny inputs, 1 step: checks it runs")
    args = ap.parse_args(argv)

    cfg = compose_profile(args.profile, REPO / "conf")
    tcfg, width = cfg["train"], cfg["model"]["width"]
    steps, warmup = (1, 0) if args.quick else (args.steps, 2)
    print(
        f"machine: {machine_line()}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
    )
    rate = sgemm_gflops(steps)
    print(f"fp32 sgemm 1024^2: {rate:.1f} GFLOP/s (the ceiling)")
    print(
        f"{'training':<10} {'steps':>6} {'GFLOP/step':>11} {'s/step':>7} {'GFLOP/s':>8} "
        f"{'s':>7} {'s at sgemm':>11}"
    )
    rows = []
    pre = cfg["download"]["vgg16"].get("pretrain")
    if cfg["download"]["generate_sample"] and pre:
        batch = 2 if args.quick else pre["batch_size"]
        n = pre["train_per_class"] * NUM_CLASSES
        torch.manual_seed(0)
        model = vgg16_bn_classifier(width, dropout=0.0)
        x, y = torch.randn(batch, 3, CROP_SIZE, CROP_SIZE), torch.randint(0, NUM_CLASSES, (batch,))
        gflop, sec = step_cost(model, x, lambda out: F.cross_entropy(out, y), steps, warmup)
        scale = pre["batch_size"] / batch  # quick mode: cost of the real batch, linearly
        rows.append(
            (
                "pretrain",
                math.ceil(n / pre["batch_size"]) * pre["epochs"],
                gflop * scale,
                sec * scale,
            )
        )
    n_images, source = train_images(cfg, args.train_images)
    batch = tcfg["batch_size"] * tcfg["accumulate"]
    size = 64 if args.quick else tcfg["crop_size"]
    for name in CASCADE:
        total, _ = iteration_budget(train_config(cfg).stages[name], math.ceil(n_images / batch))
        torch.manual_seed(0)
        model = build_model(architecture(name, tcfg), num_classes=NUM_CLASSES, width=width)
        x = torch.randn(tcfg["batch_size"], 3, size, size)
        y = torch.randint(0, NUM_CLASSES, (tcfg["batch_size"], size, size))
        gflop, sec = step_cost(model, x, lambda out, y=y: summed_loss(out, y), steps, warmup)
        rows.append((name, total * tcfg["accumulate"], gflop, sec))
    for name, n_steps, gflop, sec in rows:
        print(
            f"{name:<10} {n_steps:>6} {gflop:>11.2f} {sec:>7.3f} {gflop / sec:>8.1f} "
            f"{n_steps * sec:>7.1f} {n_steps * gflop / rate:>11.1f}"
        )
    flops = sum(n * g for _, n, g, _ in rows)
    measured = sum(n * s for _, n, _, s in rows)
    print(f"FCN training set: {n_images} images ({source}), input {size} px")
    print(
        f"total training: {flops / 1e3:.2f} TFLOP, {measured:.1f} s at the measured rate "
        f"({flops / measured:.1f} GFLOP/s, {flops / measured / rate:.2f}x sgemm), "
        f"{flops / rate:.1f} s at the sgemm rate"
    )


if __name__ == "__main__":
    main()
