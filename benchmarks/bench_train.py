"""Training throughput of FCN-8s: the project's loop vs a plain fp32 NCHW loop, side by side.

The project's step (pipeline.training.step.forward_backward + SGD) runs with the precision and memory
format the params choose (`auto`: bf16 autocast where the CPU has native bf16, AMP on CUDA;
channels_last); the baseline is the same model and optimiser in fp32 NCHW. Variants are
interleaved in one process, median of the timed steps, so machine noise hits both alike.

    python benchmarks/bench_train.py                 # width 1/8 and full width, CPU
    python benchmarks/bench_train.py --widths 0.125  # quick
    python benchmarks/bench_train.py --device cuda   # where a GPU is lent
    python benchmarks/bench_train.py --quick         # seconds: checks the script still runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# this checkout's `pipeline`, whichever project an installed copy points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import machine_line as base_machine_line  # noqa: E402  (benchmarks/machine.py)

from pipeline.classes import NUM_CLASSES  # noqa: E402
from pipeline.device import resolve_precision  # noqa: E402
from pipeline.models.fcn import build_model  # noqa: E402
from pipeline.training.solver import make_optimizer  # noqa: E402
from pipeline.training.step import forward_backward  # noqa: E402


def machine_line() -> str:
    return f"{base_machine_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_variant(width, device, amp_dtype, channels_last, seed=0):
    torch.manual_seed(seed)
    model = build_model("fcn8s", num_classes=NUM_CLASSES, width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model, 1e-10, 0.99, 5e-4)
    return model, opt, amp_dtype, channels_last


def step(variant, x, y, device):
    model, opt, amp_dtype, channels_last = variant
    opt.zero_grad(set_to_none=True)
    forward_backward(model, x, y, 1.0, device, amp_dtype, channels_last)
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_width(width, args, device):
    amp = resolve_precision(args.precision, device)
    variants = {
        "baseline fp32 NCHW": make_variant(width, device, None, False),
        f"project ({'fp32' if amp is None else str(amp).split('.')[-1]}"
        f"{', channels_last' if args.channels_last else ''})": make_variant(
            width, device, amp, args.channels_last
        ),
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), generator=g)
    times = {k: [] for k in variants}
    for v in variants.values():  # warm-up (allocator, oneDNN kernels)
        for _ in range(args.warmup):
            step(v, x, y, device)
    for _ in range(args.steps):
        for k, v in variants.items():  # interleaved
            t = time.perf_counter()
            step(v, x, y, device)
            times[k].append(time.perf_counter() - t)
    rates = {k: args.batch / statistics.median(t) for k, t in times.items()}
    params = sum(p.numel() for p in variants["baseline fp32 NCHW"][0].parameters())
    base = rates["baseline fp32 NCHW"]
    print(
        f"\nFCN-8s width {width:g} ({params:,} params), train {args.size}x{args.size}, "
        f"batch {args.batch}, {args.steps} timed steps, device {device}"
    )
    for k, r in rates.items():
        print(f"  {k:<40s} {r:8.3f} img/s   {r / base:5.2f}x")
    return rates


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument(
        "--quick", action="store_true", help="seconds: width 1/16, 64x64, 2 timed steps"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.size, args.steps, args.warmup = [0.0625], 64, 2, 1
    device = torch.device(args.device)
    print(machine_line())
    for w in args.widths:
        bench_width(w, args, device)


if __name__ == "__main__":
    main()
