"""Validation during training: the project's one scoring function, on a slice per rank.

Each rank scores the val images i = rank, rank + W, ... at original resolution with
`pipeline.evaluation.score.evaluate_model` (the function the evaluate stage scores with), the
ranks' confusion matrices are summed, and the scores come from the sum
(`pipeline.evaluation.metrics.segmentation_scores`), so DDP validation equals one process's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN benchmark mode set to `enabled` for the block, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """The val scores of `model` (`segmentation_scores`: mean IoU, pixel accuracy, ...) over
    `dataset` at original resolution, one image per forward pass.

    Rank r scores images r, r + world, ... (`evaluate_model` over a `Subset`); the (C, C)
    int64 confusion matrices are summed with `all_reduce` on `device`, the process group's
    device (NCCL takes CUDA tensors only). The model's train/eval mode is restored after and
    the global RNG is not drawn from (`evaluate_model`'s loader has its own generator); cuDNN benchmark mode is off meanwhile (nearly every image is a new
    shape to time).
    """
    from torch.utils.data import Subset

    from pipeline.evaluation.metrics import segmentation_scores
    from pipeline.evaluation.score import evaluate_model

    was_training = model.training
    with cudnn_benchmark(False):
        hist = evaluate_model(
            model,
            Subset(dataset, range(rank, len(dataset), world)),
            device=device,
            precision=amp_dtype,
            channels_last=channels_last,
            batch_size=1,
            progress=False,
        )
    if world > 1:
        hist = hist.to(device)
        dist.all_reduce(hist)
    model.train(was_training)
    return segmentation_scores(hist.cpu())


def validation_due(iteration: int, epoch_end: int, val_every_iter: int | None) -> bool:
    """Whether to validate inside an epoch after `iteration` steps: every `val_every_iter`
    iterations (None: never), except at the epoch's last step (`epoch_end`), whose own entry
    follows. With epochs of 100k+ images (COCO), epoch-end validation alone shows nothing for
    hours."""
    return val_every_iter is not None and iteration % val_every_iter == 0 and iteration < epoch_end
