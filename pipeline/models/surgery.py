"""Net surgery: the paper's initialisations and the weight transfers between networks.

One function per idea of Long, Shelhamer and Darrell (and of `surgery.py` in their release):
- `bilinear_kernel`: upsampling ("deconvolution") filters start as bilinear interpolation;
- `zero_init_scores`: class-score layers start at zero (and nothing else does);
- `load_vgg16_backbone`: ImageNet VGG16 -> FCN, the classifier's fc6/fc7 Linear layers
  reshaped into 7x7 and 1x1 convolutions ("convolutionalization");
- `transplant`: staged training, FCN-32s -> FCN-16s -> FCN-8s by parameter name;
- `init_random`, `random_vgg16_state_dict`: from-scratch training and offline sample weights.

The VGG16 layer plan (torchvision's `features.N` indices, scaled by a width multiplier) lives
here because it is the contract between the weight file and the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# VGG16 ("configuration D"): conv3x3 channels, "M" = 2x2 max pool. torchvision's `features`
# Sequential interleaves a ReLU after every conv, which fixes the `features.N` indices below.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
FC_CHANNELS = 4096  # fc6/fc7 width of VGG16
IMAGENET_CLASSES = 1000  # classifier.6 of the ImageNet model; FCN discards it

# Indices of the convolutions in torchvision's `features` Sequential: 0, 2, 5, 7, 10, ...
VGG16_CONV_INDICES: tuple[int, ...] = tuple(
    i
    for i, v in enumerate(
        layer for v in VGG16_CFG for layer in (("M",) if v == "M" else ("conv", "relu"))
    )
    if v == "conv"
)


def scale_channels(channels: int, width: float) -> int:
    """`channels * width`, rounded half up, at least 1: the width multiplier of every layer."""
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return max(1, int(math.floor(channels * width + 0.5)))


def vgg16_channels(width: float) -> tuple[list[int], int]:
    """Output channels of the 13 convs and of fc6/fc7 at `width`."""
    convs = [scale_channels(v, width) for v in VGG16_CFG if v != "M"]
    return convs, scale_channels(FC_CHANNELS, width)


# --- initialisations -------------------------------------------------------------------------


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """ConvTranspose2d weight [in, out, k, k] that performs bilinear interpolation.

    Channel i maps only to channel i (a diagonal over channels): each class map is upsampled on
    its own. With stride s and kernel 2s this is exact bilinear interpolation by a factor s.
    """
    if in_channels != out_channels:
        raise ValueError(
            f"bilinear upsampling maps each channel to itself: in_channels ({in_channels}) "
            f"must equal out_channels ({out_channels})"
        )
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = torch.outer(filt1d, filt1d).to(torch.float32)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    idx = torch.arange(in_channels)
    weight[idx, idx] = filt
    return weight


@torch.no_grad()
def init_upsampling(model: nn.Module) -> list[str]:
    """Set every ConvTranspose2d of `model` to bilinear interpolation; returns their names.

    Whether a layer then learns is the model's choice (`requires_grad`): the paper learns the
    2x upsamplings and keeps the final one fixed.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ConvTranspose2d):
            k_h, k_w = m.kernel_size
            if k_h != k_w or m.groups != 1:
                raise ValueError(f"{name}: bilinear init needs a square, ungrouped kernel")
            m.weight.copy_(bilinear_kernel(m.in_channels, m.out_channels, k_h))
            if m.bias is not None:
                m.bias.zero_()
            names.append(name)
    return names


def fix_upsampling(model: nn.Module) -> list[str]:
    """Keep every upsampling layer (`nn.ConvTranspose2d`: `upscore`, `upscore2`,
    `upscore_pool4`, `upscore16`, `upscore8`) at the weights it has: `requires_grad` off, so
    the optimiser (`pipeline.training.solver.param_groups`) leaves them out. Returns their names.

    The FCN release creates every `Deconvolution` of voc-fcn{32,16,8}s/net.py with
    `param=[dict(lr_mult=0)]`: `surgery.interp` sets them to bilinear and nothing trains them
    (pytorch-fcn freezes them too). Without this the paper's text is followed instead: the 2x
    upsamplings of FCN-16s/8s learn, initialised bilinear (Long et al., section 3.3).
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ConvTranspose2d):
            for p in m.parameters():
                p.requires_grad_(False)
            names.append(name)
    return names


def is_score_layer(name: str) -> bool:
    """Whether module `name` (or a parameter's module path) is a class-score layer: `score_fr`,
    `score_pool4`, `score_pool3` (the Caffe names), the layers the paper zero-initialises."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return bool(parts) and parts[-1].startswith("score")


@torch.no_grad()
def zero_init_scores(model: nn.Module) -> list[str]:
    """Zero the class-score convolutions (`score_fr`, `score_pool4`, `score_pool3`).

    Only these: a zero layer still gets a gradient from its (non-zero) input, but two zero
    layers in a row pass none to each other and stay zero for ever.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and is_score_layer(name):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no score layers (modules named score*)")
    return names


@torch.no_grad()
def init_random(model: nn.Module, seed: int) -> None:
    """From-scratch init: He (kaiming, fan_in, ReLU) convs with zero bias, zero score layers,
    bilinear upsampling. Deterministic for a seed, whatever the device; global RNG untouched."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not is_score_layer(name):
            fan_in = m.weight[0].numel()
            w = torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in)
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
    zero_init_scores(model)
    init_upsampling(model)


def random_vgg16_state_dict(width: float, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised VGG16 state dict with torchvision's key names, at any width.

    Initialised like torchvision's VGG (kaiming normal fan_out for convs, N(0, 0.01) for
    Linear, zero biases). The offline sample profile uses it in place of the ImageNet weights.
    """
    gen = torch.Generator().manual_seed(seed)
    convs, fc = vgg16_channels(width)
    sd: dict[str, torch.Tensor] = {}
    in_c = 3
    for idx, out_c in zip(VGG16_CONV_INDICES, convs, strict=True):
        std = math.sqrt(2.0 / (out_c * 9))
        sd[f"features.{idx}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=gen) * std
        sd[f"features.{idx}.bias"] = torch.zeros(out_c)
        in_c = out_c
    for idx, (n_out, n_in) in zip(
        (0, 3, 6), ((fc, in_c * 7 * 7), (fc, fc), (IMAGENET_CLASSES, fc)), strict=True
    ):
        sd[f"classifier.{idx}.weight"] = torch.randn(n_out, n_in, generator=gen) * 0.01
        sd[f"classifier.{idx}.bias"] = torch.zeros(n_out)
    return sd


# --- weight transfers ------------------------------------------------------------------------


def _vgg16_plan() -> list[tuple[str, str]]:
    """(VGG16 key, model key) pairs: features copy 1:1, classifier.0/3 become fc6/fc7."""
    plan = []
    for idx in VGG16_CONV_INDICES:
        for p in ("weight", "bias"):
            plan.append((f"features.{idx}.{p}", f"features.{idx}.{p}"))
    for src, dst in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        for p in ("weight", "bias"):
            plan.append((f"{src}.{p}", f"{dst}.{p}"))
    return plan


@torch.no_grad()
def load_vgg16_backbone(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "VGG16 state dict"
) -> list[str]:
    """Copy a torchvision VGG16 state dict into an FCN: convs 1:1, fc6/fc7 Linear -> conv.

    fc6 [4096, 512*7*7] becomes a 7x7 conv [4096, 512, 7, 7] (torch.flatten's C,H,W order) and
    fc7 [4096, 4096] a 1x1 conv, so the FCN computes the classifier at every 224x224 window.
    `source` (e.g. the file path) names the weights in errors. Everything is checked before
    anything is copied: a bad dict leaves the model untouched. Returns the model keys set.
    """
    own = dict(model.named_parameters())
    width = getattr(model, "width", "?")
    checked = []
    for src_key, dst_key in _vgg16_plan():
        if dst_key not in own:
            raise ValueError(f"{type(model).__name__} has no parameter {dst_key!r} (not an FCN?)")
        if src_key not in state_dict:
            raise ValueError(
                f"{source}: missing key {src_key!r}; expected a torchvision VGG16 state dict "
                f"(features.{{{','.join(map(str, VGG16_CONV_INDICES))}}}.*, classifier.{{0,3}}.*)"
            )
        src, dst = state_dict[src_key], own[dst_key]
        if not isinstance(src, torch.Tensor) or not src.is_floating_point():
            raise ValueError(f"{source}: {src_key} is not a floating-point tensor ({type(src)})")
        # A Linear weight is the conv weight flattened over (in, kh, kw).
        want = tuple(dst.shape) if src_key.startswith("features") else None
        if want is None:
            want = (dst.shape[0], dst[0].numel()) if dst.dim() == 4 else tuple(dst.shape)
        if tuple(src.shape) != want:
            raise ValueError(
                f"{source}: {src_key} has shape {tuple(src.shape)} but the model's {dst_key} "
                f"(width {width}) needs {want}"
                + (f", i.e. conv {tuple(dst.shape)}" if want != tuple(dst.shape) else "")
                + "; were the weights made for another width?"
            )
        if not torch.isfinite(src).all():
            raise ValueError(f"{source}: {src_key} contains NaN or infinite values")
        checked.append((src, dst, dst_key))
    for src, dst, _ in checked:
        dst.copy_(src.reshape(dst.shape))
    return [k for _, _, k in checked]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def transplant(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every parameter and buffer of `src` into the one of `dst` with the same name.

    Staged training: FCN-16s starts from FCN-32s (all shared layers; its new score_pool4 stays
    zero, so it starts predicting exactly what FCN-32s did, up to the bilinear upsamplings),
    FCN-8s from FCN-16s. Names only in one of them are left alone. Refuses, before copying
    anything, when a shared name has a different shape. Returns the names copied.
    """
    s, d = _tensors(src), _tensors(dst)
    shared = [k for k in d if k in s]
    if not shared:
        raise ValueError(
            f"transplant {type(src).__name__} -> {type(dst).__name__}: no parameter names in common"
        )
    bad = [
        f"{k}: {tuple(s[k].shape)} vs {tuple(d[k].shape)}"
        for k in shared
        if s[k].shape != d[k].shape
    ]
    if bad:
        raise ValueError(
            f"transplant {type(src).__name__} -> {type(dst).__name__}: shared names with "
            f"different shapes (other width or number of classes?): " + "; ".join(bad)
        )
    for k in shared:
        d[k].copy_(s[k])
    return shared
