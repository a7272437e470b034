"""Test-time augmentation: score a model on flipped and rescaled copies of each image.

The usual segmentation TTA (e.g. DeepLab's multi-scale + flip inputs, mmsegmentation's
`aug_test`): run the model on the image mirrored left-right and at several scales, bring each
output back to the image's frame, and average the class *probabilities*. The FCN paper scores
single-scale, unflipped images, so these metrics are reported apart from Table 2's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def tta_enabled(flip: bool, scales: Sequence[float]) -> bool:
    """Whether `flip`/`scales` ask for anything beyond one plain forward pass."""
    return bool(flip) or [float(s) for s in scales] != [1.0]


def tta_name(flip: bool, scales: Sequence[float]) -> str:
    """A short label, e.g. "flip, scales 0.75/1/1.25"."""
    parts = ["flip"] if flip else []
    if [float(s) for s in scales] != [1.0]:
        parts.append("scales " + "/".join(f"{s:g}" for s in scales))
    return ", ".join(parts) or "none"


class TestTimeAugmentation(nn.Module):
    """Wraps a segmentation model: [N, 3, H, W] normalised float -> [N, C, H, W] log of the mean
    class probability over `scales` x (identity, and the left-right flip when `flip`).

    Each scaled input is resized bilinearly (antialiased when shrinking, as the preprocessing
    does), its logits resized back to H x W bilinearly, then softmaxed; the log of the average
    is returned so that `argmax` and `softmax` of the output behave like a model's logits.

    Raises:
        ValueError: `scales` empty or holding a value <= 0.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, model: nn.Module, *, flip: bool = True, scales: Sequence[float] = (1.0,)):
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"TTA scales must be a non-empty list of positive numbers: {scales}")
        self.model, self.flip, self.scales = model, flip, [float(s) for s in scales]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        total = None
        views = 0
        for s in self.scales:
            xs = x
            if s != 1.0:
                size = (max(1, round(h * s)), max(1, round(w * s)))
                xs = F.interpolate(x, size=size, mode="bilinear", antialias=s < 1.0)
            for flipped in (False, True) if self.flip else (False,):
                out = self.model(xs.flip(-1) if flipped else xs).float()
                if flipped:
                    out = out.flip(-1)
                if out.shape[-2:] != (h, w):
                    out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
                p = out.softmax(1)
                total = p if total is None else total + p
                views += 1
        return (total / views).clamp_min(1e-12).log()
