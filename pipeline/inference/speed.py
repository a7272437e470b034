"""Inference speed, memory and size of a trained FCN: what a user deploying it looks at.

Per model, in fp32 on one device, batch 1:

* images per second and p50/p95 latency (ms per forward pass) at 500x500 (the size of most
  VOC photos' longer side) and at the val set's own image sizes, after a warm-up, over several
  repeats; inputs are already on the device, so the figures are the network's, not decoding's;
* peak memory of one pass over the same inputs (CUDA: `torch.cuda.max_memory_allocated`
  above what was allocated before; CPU: the process's RSS increase, sampled with psutil);
* parameter count and GFLOPs at 500x500, counted by `torch.utils.flop_counter.FlopCounterMode`
  (one multiply-add = 2 FLOPs) on a meta-device copy, so no arithmetic is run.

Timings differ from run to run, so the DVC stage `inference_report` writes them on its own:
the whole report per model in reports/inference/<model>.json (a cached output), and one
headline number per model, its images per second at 500x500 (`speed_metrics`), in the DVC
metrics file metrics/inference.json: `dvc metrics diff` then shows a speed regression, and no
other stage's output depends on the clock.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import platform
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_SIZE = (500, 500)  # (height, width)
MEMORY_SAMPLE_S = 0.001  # RSS sampling period on the CPU


# --- the machine -----------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured: {"line", "cpu", "gpu", "torch", "threads"}.

    `line` is one readable sentence, e.g. "NVIDIA H100 80GB HBM3 (CUDA 12.8), torch 2.14.1" or
    "Intel(R) Xeon(R) ... (2 cores), torch 2.14.1, 2 threads"; `gpu` is None on the CPU.
    """
    device = torch.device(device)
    threads = torch.get_num_threads()
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if gpu is not None:
        line = f"{gpu} (CUDA {torch.version.cuda}), torch {torch.__version__}; host CPU {cpu}"
    else:
        line = f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, {threads} threads"
    return {"line": line, "cpu": cpu, "gpu": gpu, "torch": torch.__version__, "threads": threads}


# --- size and arithmetic ---------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen ones included: the fixed bilinear upsamplers are weights
    the deployed model carries too)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, height: int = 500, width: int = 500) -> float:
    """GFLOPs (1e9 FLOPs, a multiply-add counted as 2) of one forward pass on a [1,3,H,W] input.

    Counted by `torch.utils.flop_counter.FlopCounterMode` on a meta-device copy of `model`:
    nothing is computed and `model` is left as it was. Raises ValueError for a size < 1.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if height < 1 or width < 1:
        raise ValueError(f"input size must be >= 1x1, got {height}x{width}")
    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops() / 1e9


# --- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_inputs(
    images: Sequence[torch.Tensor], device: torch.device, channels_last: bool = True
) -> list[torch.Tensor]:
    """Normalised float [3,H,W] (or [1,3,H,W]) images -> [1,3,H,W] fp32 tensors on `device`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for im in images:
        x = im if im.dim() == 4 else im[None]
        if x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected an image [3,H,W] or [1,3,H,W], got {tuple(im.shape)}")
        out.append(x.to(device=device, dtype=torch.float32).contiguous(memory_format=fmt))
    return out


def time_forward(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    warmup: int,
    repeats: int,
) -> list[float]:
    """Latencies in ms of `repeats` passes over `inputs`, one forward per input, after `warmup`
    untimed passes; `model` and the inputs are already on one device. len = repeats * inputs.

    Each forward is timed alone (CUDA: synchronised before and after), so the list holds
    per-image latencies at batch 1. Raises ValueError for no inputs, repeats < 1, warmup < 0.
    """
    if not inputs:
        raise ValueError("no inputs to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = inputs[0].device
    latencies: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            for x in inputs:
                model(x)
        _sync(device)
        for _ in range(repeats):
            for x in inputs:
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                latencies.append(1000.0 * (time.perf_counter() - t0))
    return latencies


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """{"images_per_s", "latency_p50_ms", "latency_p95_ms", "latency_mean_ms"} of per-image
    (batch 1) latencies; percentiles by linear interpolation (numpy's default)."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0 or not np.all(lat > 0):
        raise ValueError("latencies must be a non-empty list of positive times")
    return {
        "images_per_s": float(lat.size / (lat.sum() / 1000.0)),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "latency_mean_ms": float(lat.mean()),
    }


# --- memory ----------------------------------------------------------------------------------


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so an RSS increase is this pass's own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mib(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, str]:
    """(peak memory in MiB of one forward per input, how it was measured).

    CUDA: `torch.cuda.max_memory_allocated` during the pass minus what was allocated before
    (activations and workspaces; the weights were already there). CPU: the process's resident
    set size sampled every ms by psutil during the pass, peak minus the RSS before it, after
    freed heap memory was handed back to the OS; a lower bound (a peak between two samples, or
    memory the allocator kept, is missed).
    """
    device = inputs[0].device
    with torch.inference_mode():
        if device.type == "cuda":
            _sync(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for x in inputs:
                model(x)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            return peak / 2**20, "cuda: torch.cuda.max_memory_allocated minus allocated before"
        import psutil

        proc = psutil.Process()
        _trim_heap()
        before = proc.memory_info().rss
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, proc.memory_info().rss)
                done.wait(MEMORY_SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for x in inputs:
                model(x)
                peak = max(peak, proc.memory_info().rss)
        finally:
            done.set()
            sampler.join()
    return max(peak - before, 0) / 2**20, "cpu: psutil RSS peak minus RSS before (1 ms samples)"


# --- one model -------------------------------------------------------------------------------


def val_latency(
    model: nn.Module, val: Sequence[torch.Tensor], *, warmup: int, repeats: int
) -> dict[str, Any]:
    """`latency_summary` over the val images (prepared [1, 3, H, W] inputs), with their count
    and their distinct sizes ("375x500, 500x333")."""
    at_val: dict[str, Any] = latency_summary(
        time_forward(model, val, warmup=warmup, repeats=repeats)
    )
    sizes = sorted({tuple(x.shape[2:]) for x in val})
    at_val["images"] = len(val)
    at_val["sizes"] = ", ".join(f"{h}x{w}" for h, w in sizes)
    return at_val


def benchmark_model(
    model: nn.Module,
    val_images: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    size: tuple[int, int] = DEFAULT_SIZE,
    channels_last: bool = True,
) -> dict[str, Any]:
    """The inference report of one model: the reports/inference/<name>.json dict.

    `val_images`: normalised float [3,H,W] images (their own sizes, batch 1); may be empty, then
    "at_val_sizes" is None. The model is moved to `device` ("auto" resolves as the stages do),
    put in eval mode and run in fp32. Memory: `peak_memory_mib` over the `size` input and the
    val images, which is also the first of the `warmup` untimed passes (so warmup 0 still makes
    that one); timings: `time_forward`; GFLOPs: `count_gflops` at `size`.
    """
    from pipeline.device import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    height, width = size
    params = count_parameters(model)
    gflops = count_gflops(model, height, width)
    model.to(dev).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    fixed = prepare_inputs([torch.randn(3, height, width, generator=g)], dev, channels_last)
    val = prepare_inputs(val_images, dev, channels_last)
    # the memory pass is the first warm-up pass (one forward per input, untimed)
    memory, method = peak_memory_mib(model, fixed + val)
    rest = max(warmup - 1, 0)
    at_size = latency_summary(time_forward(model, fixed, warmup=rest, repeats=repeats))
    at_val = val_latency(model, val, warmup=rest, repeats=repeats) if val else None
    machine = machine_info(dev)
    return {
        "model": getattr(model, "arch", type(model).__name__),
        "device": dev.type,
        "precision": "fp32",
        "batch_size": 1,
        "channels_last": channels_last,
        "machine": machine["line"],
        "cpu": machine["cpu"],
        "gpu": machine["gpu"],
        "torch": machine["torch"],
        "threads": machine["threads"],
        "warmup": warmup,
        "repeats": repeats,
        "parameters": params,
        f"gflops_{height}x{width}": gflops,
        f"at_{height}x{width}": at_size,
        "at_val_sizes": at_val,
        "peak_memory_mib": memory,
        "peak_memory_method": method,
    }


def speed_metrics(
    reports: Mapping[str, Mapping[str, Any]], size: tuple[int, int] = DEFAULT_SIZE
) -> dict[str, float]:
    """The DVC metrics of the inference_report stage (metrics/inference.json): {model name:
    images per second at `size` (height, width)}, rounded to 2 decimals (run-to-run noise is
    larger), from `benchmark_model` reports by model name. One short key per model keeps
    `dvc metrics show` narrow; everything else stays in the reports.

    Raises:
        KeyError: a report has no timing at `size`.
    """
    key = f"at_{size[0]}x{size[1]}"
    return {name: round(float(r[key]["images_per_s"]), 2) for name, r in reports.items()}


def load_val_images(val_dir: str | os.PathLike, n: int) -> tuple[list[torch.Tensor], list[str]]:
    """The first `n` val records by key (fixed whatever the shard order): normalised float
    [3,H,W] images at their original size, and their keys. n <= 0 gives none."""
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import normalize

    shards = SegmentationShards(val_dir)
    keys = sorted(range(len(shards)), key=shards.key)[: max(n, 0)]
    images = [normalize(torch.as_tensor(shards.load(i)[0])[None])[0] for i in keys]
    return images, [shards.key(i) for i in keys]
