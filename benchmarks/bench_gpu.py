"""GPU figures of FCN-8s: training img/s per batch size and precision, inference latency, peak
memory. Random weights and inputs (speed does not depend on them); the project's own training
step (pipeline.training.step: forward_backward, the fused/foreach SGD, channels_last, cuDNN autotuning).

    benchmarks/gpu_check.sh                          # on a GPU machine: all figures, < 8 min
    python benchmarks/bench_gpu.py                   # the same without the CUDA check/timeout
    python benchmarks/bench_gpu.py --quick           # seconds, any device: the script still runs
    python benchmarks/bench_gpu.py --device cpu --width 0.0625 --crop 64 --steps 2 --batches 1

Training: FCN-8s at `--width` (1.0: the full 134 M-parameter net), `--crop` square crops, each
batch size of `--batches` in each precision of `--precisions` (bf16: autocast, fp32 master
weights); `--warmup` steps, then `--steps` timed ones between two device synchronisations.
Inference: one `--infer-size` square image at a time, eval mode, no grad; p50/p95 of the
per-image latency over `--runs` images. Peak memory: torch.cuda.max_memory_allocated since the
variant started (n/a off CUDA).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

# this checkout's `pipeline`, whichever project an installed copy points at; and machine.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import machine_line as base_machine_line  # noqa: E402  (benchmarks/machine.py)

from pipeline.classes import NUM_CLASSES  # noqa: E402
from pipeline.models.fcn import build_model  # noqa: E402
from pipeline.training.solver import make_optimizer  # noqa: E402
from pipeline.training.step import enable_fast_kernels, forward_backward  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_line(device: torch.device) -> str:
    """The device (GPU name and CUDA version on CUDA), torch version and host CPU."""
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        name = f"{device.type} (no GPU)"
    return f"{name}, torch {torch.__version__}; host: {base_machine_line()}"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Free cached blocks and restart the peak-memory counter (CUDA only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last `reset_peak`, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def fcn8s(width: float, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """FCN-8s at `width` with random weights, on `device`, channels_last."""
    torch.manual_seed(seed)
    model = build_model("fcn8s", num_classes=NUM_CLASSES, width=width).to(device)
    return model.to(memory_format=torch.channels_last)


def train_rate(
    width: float,
    batch: int,
    crop: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    warmup: int = 3,
    steps: int = 10,
) -> dict[str, float | None]:
    """Training throughput of one variant: {"img_s": images per second over the `steps` timed
    optimiser steps, "peak_mib": peak allocated GPU memory (None off CUDA)}.

    Inputs: [batch, 3, crop, crop] float32 normal noise and [batch, crop, crop] int64 labels in
    0..20. Raises torch.cuda.OutOfMemoryError when the variant does not fit.
    """
    reset_peak(device)
    model = fcn8s(width, device)
    model.train()
    opt = make_optimizer(model, 1e-10, 0.99, 5e-4, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch, crop, crop), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward_backward(model, x, y, float(batch), device, amp_dtype, True)
        opt.step()

    for _ in range(warmup):  # cuDNN autotuning, allocator, lazy init
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t
    out = {"img_s": batch * steps / elapsed, "peak_mib": peak_mib(device)}
    return out


@torch.no_grad()
def inference_latency(
    width: float,
    size: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    warmup: int = 3,
    runs: int = 20,
) -> dict[str, float | None]:
    """Single-image inference of one [1, 3, size, size] input, eval mode: {"img_s": images per
    second, "p50_ms"/"p95_ms": per-image latency percentiles in milliseconds (each image timed
    from input on the host to the argmax label map back on the host), "peak_mib"}."""
    from pipeline.device import autocast

    reset_peak(device)
    model = fcn8s(width, device)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def predict() -> torch.Tensor:
        xb = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            return model(xb).argmax(1).cpu()  # .cpu() waits for the device

    for _ in range(warmup):
        predict()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        predict()
        times.append(time.perf_counter() - t)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    out = {
        "img_s": len(times) / sum(times),
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * p95,
        "peak_mib": peak_mib(device),
    }
    return out


def _mem(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib:8.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Print the machine line, then one line per variant; returns the exit status (0)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cpu | auto (default: %(default)s)")
    ap.add_argument("--width", type=float, default=1.0, help="VGG16 channel multiplier")
    ap.add_argument("--crop", type=int, default=320, help="training crop side, pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per training variant")
    ap.add_argument("--infer-size", type=int, default=500, help="inference image side, pixels")
    ap.add_argument("--runs", type=int, default=20, help="timed images per inference variant")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="seconds: width 1/16, crop 64, batch 1, 2 steps, 64x64 inference, CPU without CUDA",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.crop, args.batches, args.steps = 0.0625, 64, [1], 2
        args.warmup, args.infer_size, args.runs = 1, 64, 3
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    enable_fast_kernels(device)  # what training sets: cuDNN autotuning on CUDA
    print(machine_line(device))
    params = sum(p.numel() for p in build_model("fcn8s", NUM_CLASSES, args.width).parameters())
    print(
        f"\nFCN-8s width {args.width:g} ({params:,} params), training {args.crop}x{args.crop} "
        f"crops, SGD, channels_last, {args.warmup} warm-up + {args.steps} timed steps"
    )
    for precision in args.precisions:
        for batch in args.batches:
            label = f"  train {precision:<4s} batch {batch:>3d}"
            try:
                r = train_rate(
                    args.width,
                    batch,
                    args.crop,
                    PRECISIONS[precision],
                    device,
                    args.warmup,
                    args.steps,
                )
            except torch.cuda.OutOfMemoryError:
                print(f"{label}  out of memory", flush=True)
                continue
            print(f"{label}  {r['img_s']:9.2f} img/s   peak {_mem(r['peak_mib'])}", flush=True)
    print(
        f"\ninference {args.infer_size}x{args.infer_size}, batch 1, eval, {args.runs} images "
        f"after {args.warmup} warm-up"
    )
    for precision in args.precisions:
        r = inference_latency(
            args.width, args.infer_size, PRECISIONS[precision], device, args.warmup, args.runs
        )
        print(
            f"  infer {precision:<4s} {r['img_s']:9.2f} img/s   p50 {r['p50_ms']:8.2f} ms   "
            f"p95 {r['p95_ms']:8.2f} ms   peak {_mem(r['peak_mib'])}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
