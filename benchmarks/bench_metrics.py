"""Benchmark: confusion-matrix accumulation, pipeline.evaluation.metrics.confusion_matrix vs baselines.

The val set's confusion matrix is 21 classes over label maps of 500x375 with 255 on object
boundaries. Every variant counts the same maps (uint8, as decoded from the label PNGs) and must
give the identical matrix; they run interleaved (one round = each variant once, in an order
rotated every round) and the median of the rounds is reported in megapixels per second:

  numpy fast_hist     the original FCN score.py, per map: mask, int64 index, np.bincount
                      (the baseline: 214 MP/s measured earlier)
  torch masked        torchvision references' ConfusionMatrix.update, per map (107 MP/s measured earlier)
  torchmetrics        MulticlassConfusionMatrix(validate_args=False), per map (--torchmetrics;
                      105 MP/s measured earlier)
  ours, per map       confusion_matrix(pred, gt) for each map (how evaluate calls it)
  ours, int64 inputs  the same on int64 maps (what argmax and the dataset hand over)
  ours, batched       one confusion_matrix call on all maps stacked
  ours, 1 thread      per map with torch.set_num_threads(1) (numpy is single-threaded too)

  python benchmarks/bench_metrics.py             # 100 maps, 7 rounds
  python benchmarks/bench_metrics.py --full      # 1449 maps (VOC 2012 val), 5 rounds
  python benchmarks/bench_metrics.py --quick     # seconds: checks the script still runs

On an idle 2-core machine the default run takes well under a minute; on a busy one the two
torch baselines, whose ops run in OpenMP regions, can take seconds per round (4 minutes in
all at load average 6-10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

from pipeline.evaluation.metrics import confusion_matrix  # noqa: E402


def make_maps(n: int, h: int, w: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """VOC-like (gt, pred) uint8 maps: blobs of 1-3 classes on background, 255 along the
    object boundaries (about 5% of the pixels, as in VOC), a prediction that is off by a few
    pixels at the boundaries and wrong in some blocks."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n, h, w), np.uint8)
    pred = np.zeros((n, h, w), np.uint8)
    cell = 25
    for k in range(n):
        grid_cls = rng.integers(1, classes, size=3)
        coarse = rng.random(((h + cell - 1) // cell, (w + cell - 1) // cell))
        coarse_lab = np.where(coarse < 0.6, 0, grid_cls[rng.integers(0, 3, coarse.shape)])
        g = np.repeat(np.repeat(coarse_lab, cell, 0), cell, 1)[:h, :w].astype(np.uint8)
        p = np.roll(g, (rng.integers(-4, 5), rng.integers(-4, 5)), axis=(0, 1))
        wrong = np.repeat(np.repeat(rng.random(coarse.shape) < 0.1, cell, 0), cell, 1)[:h, :w]
        p = np.where(wrong, rng.integers(0, classes), p).astype(np.uint8)
        edge = np.zeros((h, w), bool)  # 2-pixel-wide void band on class boundaries
        edge[:, 1:] |= g[:, 1:] != g[:, :-1]
        edge[1:, :] |= g[1:, :] != g[:-1, :]
        edge[:, :-1] |= edge[:, 1:]
        edge[:-1, :] |= edge[1:, :]
        g[edge] = 255
        gt[k], pred[k] = g, p
    return gt, pred


def fast_hist(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """FCN score.py (shelhamer/fcn.berkeleyvision.org), verbatim in spirit."""
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n**2).reshape(n, n)


def torch_masked(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """torchvision references/segmentation/utils.py ConfusionMatrix.update."""
    k = (a >= 0) & (a < n)
    inds = n * a[k].to(torch.int64) + b[k]
    return torch.bincount(inds, minlength=n**2).reshape(n, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--maps", type=int, default=100, help="label maps (default: %(default)s)")
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument(
        "--repeats", type=int, default=7, help="interleaved rounds (default: %(default)s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="1449 maps (VOC 2012 val), 5 rounds")
    ap.add_argument("--torchmetrics", action="store_true", help="also time torchmetrics")
    ap.add_argument("--quick", action="store_true", help="seconds: 4 maps of 64x80, 1 round")
    args = ap.parse_args(argv)
    if args.full:
        args.maps, args.repeats = 1449, 5
    if args.quick:
        args.maps, args.height, args.width, args.repeats = 4, 64, 80, 1

    c = args.classes
    gt, pred = make_maps(args.maps, args.height, args.width, c, args.seed)
    mp = gt.size / 1e6
    tg, tp = torch.from_numpy(gt), torch.from_numpy(pred)
    small = gt.size * 16 < 2**31  # int64 copies of both: skip at full scale
    tg64, tp64 = (tg.long(), tp.long()) if small else (None, None)
    threads = torch.get_num_threads()

    def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        return run

    variants: dict[str, Callable[[], object]] = {
        "numpy fast_hist (baseline)": lambda: sum(
            fast_hist(g, p, c) for g, p in zip(gt, pred, strict=True)
        ),
        "torch masked (torchvision ref.)": lambda: sum(
            torch_masked(g, p, c) for g, p in zip(tg, tp, strict=True)
        ),
        "ours, per map": lambda: sum(
            confusion_matrix(p, g, c) for g, p in zip(tg, tp, strict=True)
        ),
        "ours, batched": lambda: confusion_matrix(tp, tg, c),
    }
    if small:
        variants["ours, per map, int64 inputs"] = lambda: sum(
            confusion_matrix(p, g, c) for g, p in zip(tg64, tp64, strict=True)
        )
    variants["ours, per map, 1 thread"] = one_thread(variants["ours, per map"])
    if args.torchmetrics and small:
        from torchmetrics.classification import MulticlassConfusionMatrix

        cm = MulticlassConfusionMatrix(num_classes=c, ignore_index=255, validate_args=False)

        def tm_run():
            cm.reset()
            for g, p in zip(tg, tp, strict=True):
                cm.update(p, g)
            return cm.compute()

        variants["torchmetrics (validate_args=False)"] = tm_run

    print(
        f"nproc {os.cpu_count()}, {cpu_model()}; torch {torch.__version__} ({threads} threads), numpy {np.__version__}"
    )
    print(f"{args.maps} maps of {args.width}x{args.height} ({mp:.1f} MP), {c} classes, "
          f"{100 * (gt == 255).mean():.1f}% void; median of {args.repeats} interleaved rounds")  # fmt: skip

    ref = np.asarray(variants["numpy fast_hist (baseline)"]())
    for name, fn in variants.items():  # warm-up and correctness: every variant, same matrix
        got = np.asarray(fn())
        if not np.array_equal(got, ref):
            raise SystemExit(f"{name}: confusion matrix differs from the baseline")
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        # rotate the order each round: no variant always follows the same one (OpenMP threads
        # left spinning by a parallel baseline would otherwise always hit the same successor)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["numpy fast_hist (baseline)"])
    print(f"\n{'variant':38s} {'median ms':>10s} {'MP/s':>8s} {'vs numpy':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:38s} {1e3 * med:10.1f} {mp / med:8.1f} {base / med:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
