"""One optimiser step of the recipe, and what the step runs on.

`train_one_step` zeroes the gradients, runs forward and backward over the step's micro-batches
(`forward_backward`: autocast, the summed loss divided by the step's `step_normaliser`, the fp16
loss scaler) and steps the optimiser. Its loss stays on the device: `LossReadback` reads the
losses back in blocks, because a read-back per step stalls the GPU queue on every iteration.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from pipeline.device import autocast
from pipeline.training.solver import step_normaliser, summed_loss

# Per-step losses stay on the device and are read back (and checked for NaN/inf) every this
# many steps: a read-back per step stalls the GPU queue on every iteration.
LOSS_READBACK_EVERY = 20


def enable_fast_kernels(device: torch.device) -> None:
    """Process-wide speed settings for training on `device`. CUDA: cuDNN benchmark mode, which
    times the convolution algorithms once per input shape and keeps the fastest: training crops
    have one fixed size (`train.crop_size`), so that search is paid once per run. (Validation
    at original resolution sees many shapes and turns it off:
    `pipeline.training.validation.cudnn_benchmark`.) Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def training_module(
    model: nn.Module, device: torch.device, distributed: bool, compile_step: bool
) -> nn.Module:
    """What the training step calls: `model` itself, wrapped in DDP when `distributed`, then in
    `torch.compile` when `compile_step` (`train.compile`; compiled lazily, at the first step).

    Only the step goes through the wrapper: checkpoints, validation and the saved model use
    `model`, whose state-dict keys stay those of the plain module.
    """
    module = model
    if distributed:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile_step:
        module = torch.compile(module)
    return module


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One micro-batch: forward under autocast, summed loss / `norm`, backward (through the
    fp16 loss scaler when one is enabled). x: [N, 3, H, W] float; y: [N, H, W] int64.

    Returns the detached 0-d loss on `device`: reading it back is left to the caller, because a
    read-back per micro-batch stalls the GPU.
    """
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x)
    loss = summed_loss(logits, y) / norm
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


@dataclass
class StepContext:
    """What one optimiser step needs besides the batches."""

    model: nn.Module  # `training_module`: the DDP and/or torch.compile wrapper, or the model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    loss: str  # mean | sum
    world: int
    distributed: bool


def train_one_step(
    ctx: StepContext, micro: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Zero the gradients, forward/backward each micro-batch (DDP syncs on the last one only),
    step. Returns this rank's step loss, detached, on the device (not read back)."""
    norm = step_normaliser([t for _, t in micro], ctx.loss, ctx.world, ctx.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=ctx.device)
    for k, (x, y) in enumerate(micro):
        last = k == len(micro) - 1
        sync = ctx.model.no_sync() if ctx.distributed and not last else contextlib.nullcontext()
        with sync:
            step_loss += forward_backward(
                ctx.model, x, y, norm, ctx.device, ctx.amp_dtype, ctx.channels_last, ctx.scaler
            )
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    return step_loss


@dataclass
class LossReadback:
    """Step losses kept on the device, read back in blocks (`LOSS_READBACK_EVERY` steps),
    averaged over ranks and checked for NaN/inf there."""

    name: str
    loss_kind: str
    world: int
    pending: list[torch.Tensor] = field(default_factory=list)
    first_iteration: int = 0  # iteration number of pending[0]

    def add(self, loss: torch.Tensor, iteration: int) -> None:
        """Keep step `iteration`'s loss (0-d, on the device) until the next `flush`."""
        if not self.pending:
            self.first_iteration = iteration
        self.pending.append(loss)

    def due(self) -> bool:
        """Whether `LOSS_READBACK_EVERY` step losses are pending."""
        return len(self.pending) >= LOSS_READBACK_EVERY

    def flush(self) -> list[float]:
        """The pending step losses as floats (rank mean).

        Raises:
            FloatingPointError: a step's loss is NaN or infinite; names the iteration and the
                lr to lower.
        """
        if not self.pending:
            return []
        values = torch.stack(self.pending).double()
        if self.world > 1:  # a rank's loss is its share x world: the mean over ranks is exact
            dist.all_reduce(values)
            values /= self.world
        out = values.tolist()
        self.pending = []
        for i, v in enumerate(out):
            if not math.isfinite(v):
                raise FloatingPointError(
                    f"{self.name}: loss is {v} at iteration {self.first_iteration + i}; lower "
                    f"train.{self.name}.lr (loss '{self.loss_kind}' wants "
                    f"{'~1e-10' if self.loss_kind == 'sum' else '~1e-4..1e-2'})"
                )
        return out
