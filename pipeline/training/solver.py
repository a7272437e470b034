"""The solver of the paper's recipe: SGD groups, the learning rate and the loss normalisation.

Long, Shelhamer, Darrell (CVPR 2015, section 4.2; the released `solver.prototxt` files) train
with SGD, momentum 0.99 or 0.9, weight decay 5e-4 or 2e-4, biases at twice the rate and without
decay, a fixed rate, and a per-pixel loss summed over the image (`normalize: false`).

The learning rate has one owner: `LrSchedule` computes the rate of an iteration and writes it
into the optimiser through `set_lr`, the one function that sets group rates (each group's
`lr_mult` applied); what is logged is the value it applied.

Loss normalisation is global: per-pixel losses are summed and divided by `step_normaliser`, a
count over the whole optimiser step (all micro-batches, all ranks), so gradient accumulation and
DDP give the same update as one big batch.

Only torch is imported here: `pipeline.training.pretrain` (the download_vgg16 stage) uses
`lr_factor` without depending on the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.classes import IGNORE_INDEX

if TYPE_CHECKING:
    from pipeline.training.recipe import StageRecipe

# The poly policy's exponent: DeepLab (Chen et al., TPAMI 2017, section 4.1) and ParseNet.
POLY_POWER = 0.9


# --- SGD over the FCN solver's parameter groups ----------------------------------------------


def param_groups(
    model: nn.Module, weight_decay: float, score_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Weights: the rate with weight decay; biases: twice the rate and no decay (the FCN
    solver's `lr_mult`/`decay_mult` 1/1 and 2/0).

    The class-score layers (`pipeline.models.surgery.is_score_layer`: the zero-initialised
    `score_fr`, `score_pool4`, `score_pool3`) learn at `score_lr_mult` times that. The FCN
    release uses 1 (every layer's `lr_mult` is 1, 2 for biases); a larger factor for the
    layers that start from nothing is the usual fine-tuning practice (DeepLab's prototxt:
    `lr_mult: 10` on its new classifier). Each group carries its `lr_mult`; its rate is 0
    until `set_lr` sets it. Frozen parameters (the fixed final bilinear upsampling) are left
    out.
    """
    from pipeline.models.surgery import is_score_layer

    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_score_layer(name), name.endswith("bias")), []).append(p)
    out = []
    for (score, bias), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": 0.0,  # set_lr's: kept here so the group's keys keep their order
                "weight_decay": 0.0 if bias else weight_decay,
                "name": ("score_" if score else "") + ("biases" if bias else "weights"),
                "lr_mult": (score_lr_mult if score else 1.0) * (2.0 if bias else 1.0),
            }
        )
    return out


def sgd_implementation(device: torch.device) -> dict[str, bool]:
    """The SGD kernel flags for parameters on `device`: `fused` (one kernel for all the
    parameters' updates) on CUDA, `foreach` (multi-tensor ops, one per group instead of one per
    parameter) elsewhere. Same update as the per-parameter loop, fewer kernel launches."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device | None = None,
    score_lr_mult: float = 1.0,
) -> torch.optim.SGD:
    """SGD with momentum over `param_groups`, its groups at base rate `lr` (`set_lr`), with the
    fast kernels of `sgd_implementation` for `device` (default: the device of the model's first
    parameter, CPU for a model without any). Call it after moving the model."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    optimizer = torch.optim.SGD(
        param_groups(model, weight_decay, score_lr_mult),
        momentum=momentum,
        **sgd_implementation(device),
    )
    set_lr(optimizer, lr)
    return optimizer


def use_sgd_implementation(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Set `sgd_implementation(device)` on every group, in place: `load_state_dict` restores
    the flags a checkpoint was saved with (an older checkpoint: none; another device: the
    other kernel, and a fused update needs its parameters on a supported device)."""
    flags = {"foreach": None, "fused": None, **sgd_implementation(device)}
    for group in optimizer.param_groups:
        group.update(flags)


# --- the learning rate -----------------------------------------------------------------------


def lr_factor(policy: str, step: int, total_steps: int, power: float = POLY_POWER) -> float:
    """The base rate's multiplier at optimiser step `step` (0-based) of `total_steps`.

    `fixed`: 1, the paper's constant rate. `poly`: (1 - step/total)^power, which settles a
    short run at its end instead of leaving it bouncing at the full rate.
    """
    if policy == "fixed":
        return 1.0
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its `lr_mult` (`param_groups`: biases 2x, score layers more).
    The only place that writes group rates."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@dataclass(frozen=True)
class LrSchedule:
    """One stage's rate: `base` (the stage's `lr`) times `lr_factor(policy, i, total_steps)`."""

    base: float
    policy: str  # fixed | poly
    total_steps: int

    def at(self, iteration: int) -> float:
        """The base rate of optimiser step `iteration` (0-based)."""
        return self.base * lr_factor(self.policy, iteration, self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set step `iteration`'s rate on `optimizer`; returns it (what is logged)."""
        lr = self.at(iteration)
        set_lr(optimizer, lr)
        return lr


def iteration_budget(recipe: StageRecipe, steps_per_epoch: int) -> tuple[int, int]:
    """(iterations, epochs) of one stage's training: `max_iter` iterations when it is set, the
    epochs derived (ceil; the last one cut short), else `epochs` full epochs of
    `steps_per_epoch` optimiser steps each. The paper's solvers count iterations (Caffe's
    `max_iter`), which keeps a recipe's meaning whatever the size of the training set.

    Raises:
        ValueError: `steps_per_epoch` < 1.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if recipe.max_iter is None:
        return steps_per_epoch * recipe.epochs, recipe.epochs
    return recipe.max_iter, math.ceil(recipe.max_iter / steps_per_epoch)


# --- the loss --------------------------------------------------------------------------------


def summed_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the valid pixels (255 ignored), computed in fp32.

    logits: [N, C, H, W] float (any precision); target: [N, H, W] int64. Returns a 0-d fp32.
    """
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


def step_normaliser(
    targets: list[torch.Tensor], loss: str, world: int, device: torch.device | None = None
) -> float:
    """What the step's summed loss is divided by, so that DDP's gradient mean over `world`
    ranks and accumulation over micro-batches equal one big batch.

    targets: this rank's label maps of the step, one [N, H, W] int64 tensor per micro-batch.
    `mean`: the number of valid pixels in the whole global step (the per-pixel normalised loss
    used with lr ~1e-4..1e-2). `sum`: the number of images in the global step, so the update is
    the per-image summed loss averaged over batch, accumulation and ranks, whatever their sizes:
    the Caffe solver's semantics (`normalize: false` divides by the batch, `iter_size` and the
    number of solvers divide the gradient), for which the paper's lr 1e-10 was set.

    The count is all-reduced on `device` (the process group's device: NCCL takes CUDA tensors
    only). Every rank gets the same number of images per step (`EpochKeySampler` pads), so
    DDP's mean over ranks turns the local image count into the global one.
    """
    if loss == "sum":
        return float(sum(t.shape[0] for t in targets))
    local = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
    valid = torch.tensor([local], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(valid)
    return max(float(valid.item()), 1.0) / world
