"""Devices, precision and autocast: shared by training, evaluation and prediction.

A module of its own so that `evaluate` and `predict` do not depend on the training loop: the
evaluate stage lists this file among its deps, not `pipeline/training/train.py`, and so does not re-run
on every training edit.
"""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` | `cpu` | `cuda` -> a torch device; under torchrun, CUDA rank r gets GPU LOCAL_RANK.

    Raises:
        RuntimeError: `cuda` was asked for and no CUDA device is available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested in params but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX)."""
    with contextlib.suppress(Exception):
        return bool(torch.cpu._is_avx512_bf16_supported())
    return False


def cuda_supports_bf16() -> bool:
    """Native bf16 on the current GPU (Ampere and later). `torch.cuda.is_bf16_supported()`
    counts emulation by default, which on V100/T4 is slower than fp16 with loss scaling."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword: only native support was counted
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `fp32|bf16|fp16|auto` on `device`, or None for plain fp32.

    `auto`: bf16 where the hardware has it natively (CUDA: Ampere and later; CPU: AVX512-BF16),
    else fp16 on CUDA (trained with a `GradScaler`, see `grad_scaler`) and fp32 on CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_supports_bf16() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context manager: autocast to `dtype` on `device`'s type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its 5-bit exponent underflows small per-pixel gradients); a
    disabled scaler, whose `scale`/`step`/`update` are plain pass-throughs, otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
