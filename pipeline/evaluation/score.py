"""The project's one scoring function: a model's confusion matrix over a dataset.

`evaluate_model` runs a model on every image of a dataset at the image's own (original)
resolution and accumulates one (C, C) confusion matrix over the whole set, as the FCN paper
scores PASCAL VOC (Long, Shelhamer, Darrell, section 5: the matrix is summed over the images
first, the metrics come from the sum, `pipeline.evaluation.metrics`). The evaluate stage, the
training-time validation and the tests all score through it, so they agree by construction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.classes import NUM_CLASSES
from pipeline.evaluation.metrics import confusion_matrix, segmentation_scores
from pipeline.inference.predict import forward_labels


def resolve_runtime(
    device: str | torch.device, precision: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for fp32) from the params' names or resolved values.

    Strings go through `pipeline.device` ("auto", "cpu", "cuda:1"; "auto", "fp32", "bf16",
    "fp16"); a `torch.device` or dtype is taken as it is, so a caller resolves once and passes
    the result to several calls. Raises what `pipeline.device` raises for an unknown name or a
    device that is not there.
    """
    from pipeline.device import resolve_device, resolve_precision

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    amp = resolve_precision(precision, dev) if isinstance(precision, str) else precision
    return dev, amp


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device` in eval mode (in place; returned for chaining), with its
    4-D weights in channels-last layout when `channels_last` (faster convolutions on CUDA and
    oneDNN CPUs)."""
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def record_key(dataset: Any, i: int) -> str:
    """Record `i`'s key ("voc/2007_000033") for datasets over shards, else its zero-padded index."""
    return dataset.key(i) if hasattr(dataset, "key") else f"{i:06d}"


def json_safe(v: float | None) -> float | None:
    """NaN (a metric of an absent class) as None, JSON's null; other values unchanged."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def image_scores(hist: torch.Tensor) -> dict[str, Any]:
    """One image's labelled pixel count, pixel accuracy and mean IoU from its (C, C) int64
    confusion matrix (rows = ground truth). The mean is over the classes in the image's
    ground truth or prediction (`pipeline.evaluation.metrics`), so it ranks images for the worst/best
    sheets; a set's mean IU is *not* the mean of these (Long et al. sum the matrices first).
    An image with no labelled pixel gets None for both scores.
    """
    s = segmentation_scores(hist)
    return {
        "labelled_pixels": s["num_pixels"],
        "pixel_accuracy": json_safe(s["pixel_accuracy"]),
        "mean_iou": json_safe(s["mean_iou"]),
    }


def _identity(x):
    return x


class _Accumulator:
    """Groups consecutive same-size images into forward passes and sums their matrices."""

    def __init__(self, model, dataset, dev, amp, channels_last, num_classes, per_image):
        self.model, self.dataset, self.dev, self.amp = model, dataset, dev, amp
        self.channels_last, self.num_classes, self.per_image = channels_last, num_classes, per_image
        self.hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, i: int, image: torch.Tensor, mask: torch.Tensor, batch_size: int) -> None:
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"val record {record_key(self.dataset, i)!r}: image {tuple(image.shape)} and "
                f"mask {tuple(mask.shape)} differ in size"
            )
        if self.pending and (
            image.shape != self.pending[0][1].shape or len(self.pending) == batch_size
        ):
            self.flush()
        self.pending.append((i, image, mask))

    def flush(self) -> None:
        if not self.pending:
            return
        x = torch.stack([im for _, im, _ in self.pending]).to(self.dev, non_blocking=True)
        y = torch.stack([m for _, _, m in self.pending]).to(self.dev, non_blocking=True)
        pred = forward_labels(self.model, x, amp_dtype=self.amp, channels_last=self.channels_last)
        try:
            self._count(pred, y)
        except ValueError as e:  # name the records: a bad label map is a data problem
            keys = [record_key(self.dataset, i) for i, _, _ in self.pending]
            raise ValueError(f"val record(s) {keys}: {e}") from None
        self.pending.clear()

    def _count(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        if self.per_image is None:
            self.hist.add_(confusion_matrix(pred, y, self.num_classes))
            return
        # one matrix per image: their sum is the same matrix, exactly (integers)
        for (i, _, _), p, t in zip(self.pending, pred, y, strict=True):
            h = confusion_matrix(p, t, self.num_classes)
            self.hist.add_(h)
            key = record_key(self.dataset, i)
            self.per_image.append({"index": i, "image": key, **image_scores(h)})


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    device: str | torch.device = "auto",
    precision: str | torch.dtype | None = "auto",
    channels_last: bool = True,
    batch_size: int = 1,
    workers: int = 0,
    num_classes: int = NUM_CLASSES,
    progress: bool = True,
    desc: str = "evaluate",
    per_image: list[dict[str, Any]] | None = None,
) -> torch.Tensor:
    """The (C, C) int64 confusion matrix of `model` over `dataset`, rows = ground truth.

    `dataset[i]` is (normalised float image [3, H, W], int64 mask [H, W] with 0..C-1 and the
    ignore label 255); `model` maps [N, 3, H, W] to logits [N, C, H, W] at the input size.
    Images are scored at their own size; up to `batch_size` consecutive images of equal size
    share a forward pass. The matrix is accumulated on `device` and returned on the CPU.
    The model is moved to `device` and put in eval mode. When `per_image` is a list, one
    `image_scores` row per image is appended to it, in dataset order, with its "index" and
    "image" key.

    Raises:
        ValueError: `batch_size` < 1, an image and its mask of different sizes, a label
            outside 0..C-1 and 255 (the records are named), or logits not at the input size.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev, amp = resolve_runtime(device, precision)
    prepare_model(model, dev, channels_last)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # sizes differ: grouped by _Accumulator
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        collate_fn=_identity,
        # its own generator: the loader's base-seed draw must not move the caller's global RNG
        # (training validates mid-run; its dropout masks and a resumed run's RNG go on after)
        generator=torch.Generator(),
    )
    acc = _Accumulator(model, dataset, dev, amp, channels_last, num_classes, per_image)
    with tqdm(
        total=len(dataset), desc=desc, unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for i, (image, mask) in enumerate(loader):  # sequential: i is the dataset index
            acc.add(i, torch.as_tensor(image), torch.as_tensor(mask), batch_size)
            bar.update(1)
        acc.flush()
    return acc.hist.cpu()
