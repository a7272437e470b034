"""Other segmentation heads, compared with the FCNs on the same data and metrics.

- `OneLayerBaseline`: one 3x3 convolution from RGB to the 21 class scores, the floor every
  model must clear (3*3*3*21 + 21 = 588 parameters).
- `fcn_resnet50`, `deeplabv3_resnet50`: torchvision's FCN and DeepLabV3 heads on a dilated
  ResNet-50 (output stride 8; torchvision.models.segmentation), built without downloading
  anything; `load_resnet50_backbone` fills the backbone from torchvision's ImageNet ResNet-50
  state dict, every tensor accounted for.

Every head maps a float32 batch [N, 3, H, W] (RGB, ImageNet mean/std, as the FCNs take it) to
logits [N, 21, H, W] at the input's size, any H and W.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from pipeline.classes import NUM_CLASSES

# the ImageNet classifier of a ResNet-50 state dict: no segmentation head reads it
RESNET50_CLASSIFIER = ("fc.weight", "fc.bias")


class OneLayerBaseline(nn.Module):
    """One 3x3 convolution (padding 1) from the normalised RGB image to the class scores: what
    a net learns from each pixel's colour and its 8 neighbours, nothing more. Parameters:
    3*3*3*num_classes + num_classes (588 for VOC's 21)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_classes = num_classes
        self.score = nn.Conv2d(3, num_classes, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] -> logits float [N, num_classes, H, W]."""
        return self.score(x)


class TorchvisionHead(nn.Module):
    """A torchvision segmentation model (`FCN`, `DeepLabV3`) whose forward returns the logits
    tensor instead of torchvision's {"out": ...} dict (the auxiliary head is off)."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    @property
    def backbone(self) -> nn.Module:
        """The dilated ResNet-50 (torchvision's IntermediateLayerGetter: conv1 ... layer4)."""
        return self.net.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] -> logits float [N, num_classes, H, W] (torchvision upsamples
        the stride-8 scores bilinearly to the input's size)."""
        return self.net(x)["out"]


def _torchvision_head(builder: Callable[..., nn.Module], num_classes: int) -> TorchvisionHead:
    # weights and weights_backbone None: random initialisation, no download; the backbone's
    # ImageNet weights come from a pinned file (`load_resnet50_backbone`)
    net = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return TorchvisionHead(net, num_classes)


def fcn_resnet50(num_classes: int = NUM_CLASSES) -> TorchvisionHead:
    """torchvision's FCN-ResNet50 (torchvision.models.segmentation.fcn_resnet50): a 3x3
    conv + 1x1 classifier on the dilated ResNet-50's layer4, randomly initialised."""
    from torchvision.models.segmentation import fcn_resnet50 as build

    return _torchvision_head(build, num_classes)


def deeplabv3_resnet50(num_classes: int = NUM_CLASSES) -> TorchvisionHead:
    """torchvision's DeepLabV3-ResNet50 (torchvision.models.segmentation.deeplabv3_resnet50:
    ASPP at rates 12/24/36 on the dilated ResNet-50), randomly initialised."""
    from torchvision.models.segmentation import deeplabv3_resnet50 as build

    return _torchvision_head(build, num_classes)


HEADS: dict[str, Callable[[int], nn.Module]] = {
    "baseline_1layer": OneLayerBaseline,
    "fcn_resnet50": fcn_resnet50,
    "deeplabv3_resnet50": deeplabv3_resnet50,
}


def build_head(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The head `name` (one of `HEADS`), randomly initialised.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; one of {', '.join(HEADS)}")
    return HEADS[name](num_classes)


class BackboneMismatchError(ValueError):
    """A backbone state dict that does not fill the model's backbone exactly."""


def load_resnet50_backbone(
    head: TorchvisionHead, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> list[str]:
    """Copy a torchvision ResNet-50 state dict (`resnet50-0676ba61.pth`'s keys: conv1, bn1,
    layer1..layer4, fc) into `head.backbone` by name. Every backbone tensor must come from
    `state` with its shape, and every tensor of `state` must be used, but the ImageNet
    classifier (`RESNET50_CLASSIFIER`), which no segmentation head reads: no silent partial
    load. Returns the keys left out (the classifier's).

    Raises:
        BackboneMismatchError: keys missing from or unknown to the backbone, or a shape that
            differs; the message names `source` and the first keys of each kind.
    """
    own = head.backbone.state_dict()
    given = {k: v for k, v in state.items() if k not in RESNET50_CLASSIFIER}
    missing = sorted(own.keys() - given.keys())
    unknown = sorted(given.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & given.keys() if own[k].shape != given[k].shape)
    problems = [
        f"{what} {len(keys)}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
        for what, keys in (
            ("backbone tensors not in the file", missing),
            ("file tensors the backbone does not have", unknown),
            ("tensors of another shape", shapes),
        )
        if keys
    ]
    if problems:
        raise BackboneMismatchError(
            f"{source}: not a torchvision ResNet-50 state dict for this backbone; "
            + "; ".join(problems)
        )
    head.backbone.load_state_dict(given, strict=True)
    return sorted(state.keys() & set(RESNET50_CLASSIFIER))
