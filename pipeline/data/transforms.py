"""Training-time augmentation and the input normalisation of torchvision's VGG16 weights.

Built on torchvision.transforms.v2 with `tv_tensors.Image` / `tv_tensors.Mask`: every geometric
step dispatches on the type, so a label map is only ever resized nearest-neighbour and padded
with 255 (an interpolated label map invents classes at every boundary). Randomness comes from
torch's global CPU generator, which `pipeline.data.datasets.SegmentationShards` seeds per sample.

    train_transform: random scale -> random crop (padded) -> mirror -> colour jitter -> normalise
    eval_transform:  normalise only, full size (scores are computed at original resolution)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.classes import IGNORE_INDEX

# torchvision's VGG16 weights: RGB in 0..1, then ImageNet mean/std (not Caffe's BGR 0..255)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# crop padding of the uint8 image: the mean colour, which normalises to ~0 (no signal)
MEAN_FILL: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)


def normalize(img_uint8: Tensor) -> Tensor:
    """uint8 RGB [..., 3, H, W] -> float32, scaled to 0..1 and ImageNet-normalised (any device)."""
    if img_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 RGB image, got {img_uint8.dtype}")
    if img_uint8.ndim < 3 or img_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got {tuple(img_uint8.shape)}")
    # (x / 255 - mean) / std as one multiply-add: half the passes over the pixels
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=img_uint8.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=img_uint8.device).view(3, 1, 1)
    x = img_uint8.as_subclass(Tensor).to(torch.float32)
    return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for x in flat_inputs:
        if isinstance(x, tv_tensors.Image | tv_tensors.Mask):
            h, w = F.get_size(x)
            return h, w
    raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask among the inputs")


class RandomScale(v2.Transform):
    """Resize image and mask by one factor drawn uniformly from `scale_range`.

    The image is resized bilinearly with antialiasing; the mask with NEAREST_EXACT, which
    samples at pixel centres like the bilinear image does (legacy NEAREST shifts it by up to
    half a pixel) and only ever copies existing class ids.
    """

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range needs 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.scale_range
        s = lo if lo == hi else float(torch.empty(()).uniform_(lo, hi))
        h, w = _spatial_size(flat_inputs)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))], "same": s == 1.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["same"]:
            return inpt
        mode = (
            v2.InterpolationMode.NEAREST_EXACT
            if isinstance(inpt, tv_tensors.Mask)
            else v2.InterpolationMode.BILINEAR
        )
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)


class Normalize(v2.Transform):
    """Image: uint8 -> ImageNet-normalised float32 (`normalize`); mask: -> int64 for the loss."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image):
            return tv_tensors.wrap(normalize(inpt), like=inpt)
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(inpt.as_subclass(Tensor).to(torch.int64), like=inpt)
        return inpt


class PairTransform:
    """Apply v2 steps to (image, mask); plain tensors are wrapped as Image/Mask first.

    Without the wrapping v2 would treat a plain-tensor mask as a second image (or leave it
    alone): a silently misaligned or interpolated label map.
    """

    def __init__(self, *steps: v2.Transform) -> None:
        self.steps = v2.Compose(list(steps))

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(image)
        if not isinstance(mask, tv_tensors.Mask):
            mask = tv_tensors.Mask(mask)
        return self.steps(image, mask)

    def __repr__(self) -> str:
        return f"PairTransform({self.steps!r})"


def train_transform(
    crop_size: int,
    scale_range: Sequence[float] = (1.0, 1.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
) -> PairTransform:
    """Random scale, crop to `crop_size` (padded: image with the mean colour, mask with 255),
    optional mirror and colour jitter (brightness/contrast/saturation +-`color_jitter`; no hue,
    which is slow on uint8 and changes class appearance), then `normalize`.

    Call as `image, mask = t(image_uint8, mask)`; image float32 [3, crop, crop], mask int64.
    """
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
        raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
    if not 0 <= color_jitter <= 1:
        raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter!r}")
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(
            crop_size,
            pad_if_needed=True,  # pads both sides, so a small image lands anywhere in the crop
            fill={tv_tensors.Image: MEAN_FILL, tv_tensors.Mask: IGNORE_INDEX},
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if color_jitter > 0:
        steps.append(
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
        )
    steps.append(Normalize())
    return PairTransform(*steps)


def eval_transform() -> PairTransform:
    """Normalise only, at full size: evaluation scores original-resolution label maps."""
    return PairTransform(Normalize())
