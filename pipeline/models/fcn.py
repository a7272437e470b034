"""FCN-32s, FCN-16s and FCN-8s on VGG16 (Long, Shelhamer and Darrell), as released in Caffe.

Faithful to the original nets (and to pytorch-fcn): conv1_1 pads by 100 and the max pools round
up (ceil mode), so every input size, 1x1 included, yields a score map that covers it; fixed crop
offsets then align each skip and the output with the input. The offsets follow from the layer
geometry: a pixel of a layer with total stride s sits at input coordinate s*i + b, e.g.
conv1_1 (pad 100) gives b = -99, each 2x2 pool b -> b + s/2, fc6 (7x7, no pad) b -> b + 3*32:
    pool3: 8i - 95.5   pool4: 16i - 91.5   score_fr: 32i + 12.5
and a transposed conv (kernel k, stride t) puts output j at input i = (j - (k-1)/2) / t. Hence
    FCN-32s  upscore (k64 s32): 32*(j-31.5)/32 + 12.5 = j - 19                  -> crop 19
    FCN-16s  upscore2 (k4 s2) at 16j - 11.5; score_pool4 16(j+c) - 91.5 -> c = 5;
             upscore16 (k32 s16): j - 15.5 - 11.5 = j - 27                      -> crop 27
    FCN-8s   upscore_pool4 (k4 s2) at 8j - 23.5; score_pool3 8(j+c) - 95.5 -> c = 9;
             upscore8 (k16 s8): j - 7.5 - 23.5 = j - 31                         -> crop 31
(tests/test_models.py re-derives them from the modules and checks them by flip symmetry.)

FCN-8s at-once (`FCN8sAtOnce`, the release fcn8s-atonce-pascal) is FCN-8s trained in one go
from VGG16 instead of staged; it differs only by fixed scales (0.01, 0.0001) on pool4 and pool3
before their score layers, so it has FCN-8s's parameters and crops.

Layer names are shared across the classes so that `pipeline.models.surgery.transplant` carries
the staged training by name; `features` keeps torchvision's VGG16 indices (`features.0` ...
`features.28`) so ImageNet weights copy 1:1. Inputs: RGB in 0..1 normalised with the ImageNet
mean/std (`normalization = "imagenet"`), what torchvision's VGG16 weights expect.

Weights made for another input (the Caffe releases: BGR 0..255 minus a mean colour) carry an
`input_adapter` (`CaffeInput`) that turns the pipeline's input into theirs as the first op, so
every model still takes the same input and evaluate/predict need not know. The model file's
`normalization` field then names the weights' own input (`CaffeInput.spec()`), and `load_model`
rebuilds the adapter from it; models without an adapter write "imagenet", as they always did.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.surgery import (
    VGG16_CFG,
    init_upsampling,
    scale_channels,
    vgg16_channels,
    zero_init_scores,
)

NORMALIZATION = "imagenet"
CONV1_PAD = 100
# Positions of pool3 and pool4 in `features` (torchvision's layout: conv, relu, ..., pool).
_LAYERS = [layer for v in VGG16_CFG for layer in (("pool",) if v == "M" else ("conv", "relu"))]
_POOLS = [i for i, v in enumerate(_LAYERS) if v == "pool"]
POOL3, POOL4 = _POOLS[2], _POOLS[3]  # 16, 23
# Mean colour (B, G, R, 0..255) subtracted from the input of the released Caffe FCNs: the
# FCN repository's voc_layers.py and infer.py (fcn.berkeleyvision.org).
CAFFE_MEAN_BGR: tuple[float, float, float] = (104.00699, 116.66877, 122.67892)
CAFFE_BGR = "caffe_bgr"  # `normalization["kind"]` of weights that take Caffe's input


class CaffeInput(nn.Module):
    """The pipeline's input -> the Caffe releases' input, exactly, as one affine map per channel.

    In: float [N, 3, H, W], RGB in 0..1 normalised with the ImageNet mean/std
    (`pipeline.data.transforms.normalize`). Out: float [N, 3, H, W], BGR in 0..255 minus `mean_bgr`
    (the Caffe nets' `data` blob). Channel k of the output is input channel 2-k times
    255*std + (255*mean - mean_bgr[k]): the inverse of `normalize`, then Caffe's own
    preprocessing. No tensors of its own (nothing in the state dict): the file's
    `normalization` field, `spec()`, is all it needs. The arithmetic stays float32 under autocast
    (element-wise ops), where a bf16 1x1 conv would round 0..255 values by up to 0.5.
    """

    def __init__(self, mean_bgr: tuple[float, float, float] | list[float] = CAFFE_MEAN_BGR) -> None:
        super().__init__()
        mean_bgr = tuple(float(m) for m in mean_bgr)
        if len(mean_bgr) != 3 or not all(math.isfinite(m) for m in mean_bgr):
            raise ValueError(f"mean_bgr must be 3 finite numbers (B, G, R), got {mean_bgr!r}")
        self.mean_bgr = mean_bgr
        std_bgr, mean_rgb_as_bgr = IMAGENET_STD[::-1], IMAGENET_MEAN[::-1]
        self._scale = tuple(255.0 * s for s in std_bgr)
        self._shift = tuple(255.0 * m - c for m, c in zip(mean_rgb_as_bgr, mean_bgr, strict=True))

    def spec(self) -> dict[str, Any]:
        """The model file's `normalization` value: {"kind": "caffe_bgr", "mean_bgr": [B, G, R]}."""
        return {"kind": CAFFE_BGR, "mean_bgr": list(self.mean_bgr)}

    @classmethod
    def from_spec(cls, spec: Any) -> CaffeInput:
        """Inverse of `spec()`; ValueError on anything else."""
        if not (isinstance(spec, dict) and spec.get("kind") == CAFFE_BGR and "mean_bgr" in spec):
            raise ValueError(
                f"normalization {spec!r} is neither {NORMALIZATION!r} nor "
                f'{{"kind": {CAFFE_BGR!r}, "mean_bgr": [B, G, R]}}'
            )
        mean = spec["mean_bgr"]
        if not isinstance(mean, list | tuple) or not all(
            isinstance(m, int | float) and not isinstance(m, bool) for m in mean
        ):
            raise ValueError(f"normalization mean_bgr must be 3 numbers, got {mean!r}")
        return cls(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self._scale, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor(self._shift, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.flip(1) * scale + shift

    def extra_repr(self) -> str:
        return f"mean_bgr={self.mean_bgr}"


def make_vgg16_features(width: float) -> nn.Sequential:
    """VGG16's conv blocks with torchvision's indices; conv1_1 pads 100, pools round up."""
    layers: list[nn.Module] = []
    in_c = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
        else:
            out_c = scale_channels(v, width)
            pad = CONV1_PAD if not layers else 1
            layers += [nn.Conv2d(in_c, out_c, 3, padding=pad), nn.ReLU(inplace=True)]
            in_c = out_c
    return nn.Sequential(*layers)


def _crop(h: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    return h[:, :, offset : offset + height, offset : offset + width]


def _crop_output(h: torch.Tensor, offset: int, x: torch.Tensor) -> torch.Tensor:
    # A fresh, compact tensor in the input's memory format: a view would pin the whole
    # uncropped map in memory and surprise callers that `.view()` the output.
    fmt = (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )
    return _crop(h, offset, x.shape[2], x.shape[3]).contiguous(memory_format=fmt)


def _upsample(channels: int, factor: int, learnable: bool) -> nn.ConvTranspose2d:
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, bias=False)
    up.weight.requires_grad_(learnable)
    return up


class _FCN(nn.Module):
    """VGG16 features + fc6/fc7 as convolutions + score_fr; subclasses add the decoder."""

    arch = ""
    normalization = NORMALIZATION
    crops: dict[str, int] = {}
    # {"pool4": s, ...}: fixed factors on the pool features before their score layers
    # (read-only constants of the class, never parameters); only the at-once FCN-8s has any
    skip_scales: Mapping[str, float] = MappingProxyType({})

    def __init__(self, num_classes: int = 21, width: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        convs, fc = vgg16_channels(width)  # validates width
        self.num_classes = num_classes
        self.width = float(width)
        # None: the weights take the pipeline's input; else a CaffeInput converting it first
        self.input_adapter: CaffeInput | None = None
        self.features = make_vgg16_features(width)
        self.fc6 = nn.Conv2d(convs[-1], fc, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)  # element-wise, as Caffe's Dropout layer
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self._build_decoder(pool3_channels=convs[6], pool4_channels=convs[9])
        init_upsampling(self)
        zero_init_scores(self)

    def _build_decoder(self, pool3_channels: int, pool4_channels: int) -> None:
        raise NotImplementedError

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pool3, pool4, score_fr) of an [N,3,H,W] batch."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.arch}: expected input [N,3,H,W], got {tuple(x.shape)}")
        h = x if self.input_adapter is None else self.input_adapter(x)
        pool3 = pool4 = h
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == POOL3:
                pool3 = h
            elif i == POOL4:
                pool4 = h
        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))
        return pool3, pool4, self.score_fr(h)

    @property
    def weights_normalization(self) -> str | dict[str, Any]:
        """The input the weights were made for: "imagenet", or the adapter's `spec()`.

        `normalization` (the class attribute) stays "imagenet": what `forward` takes.
        """
        return NORMALIZATION if self.input_adapter is None else self.input_adapter.spec()

    def extra_repr(self) -> str:
        return f"arch={self.arch}, num_classes={self.num_classes}, width={self.width}"


class FCN32s(_FCN):
    """Single stream: score_fr upsampled 32x by a fixed bilinear transposed conv."""

    arch = "fcn32s"
    crops = {"upscore": 19}

    def _build_decoder(self, pool3_channels: int, pool4_channels: int) -> None:
        self.upscore = _upsample(self.num_classes, 32, learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, score_fr = self._encode(x)
        return _crop_output(self.upscore(score_fr), self.crops["upscore"], x)


class FCN16s(_FCN):
    """score_fr upsampled 2x (learnable) + scores of pool4, then a fixed 16x upsampling."""

    arch = "fcn16s"
    crops = {"score_pool4": 5, "upscore16": 27}

    def _build_decoder(self, pool3_channels: int, pool4_channels: int) -> None:
        self.upscore2 = _upsample(self.num_classes, 2, learnable=True)
        self.score_pool4 = nn.Conv2d(pool4_channels, self.num_classes, 1)
        self.upscore16 = _upsample(self.num_classes, 16, learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, pool4, score_fr = self._encode(x)
        up2 = self.upscore2(score_fr)
        skip4 = _crop(self.score_pool4(pool4), self.crops["score_pool4"], *up2.shape[2:])
        return _crop_output(self.upscore16(up2 + skip4), self.crops["upscore16"], x)


class FCN8s(_FCN):
    """FCN-16s's fusion, upsampled 2x (learnable) + scores of pool3, then a fixed 8x."""

    arch = "fcn8s"
    crops = {"score_pool4": 5, "score_pool3": 9, "upscore8": 31}

    def _build_decoder(self, pool3_channels: int, pool4_channels: int) -> None:
        self.upscore2 = _upsample(self.num_classes, 2, learnable=True)
        self.score_pool4 = nn.Conv2d(pool4_channels, self.num_classes, 1)
        self.upscore_pool4 = _upsample(self.num_classes, 2, learnable=True)
        self.score_pool3 = nn.Conv2d(pool3_channels, self.num_classes, 1)
        self.upscore8 = _upsample(self.num_classes, 8, learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(x, *self._encode(x))

    def _decode(
        self, x: torch.Tensor, pool3: torch.Tensor, pool4: torch.Tensor, score_fr: torch.Tensor
    ) -> torch.Tensor:
        up2 = self.upscore2(score_fr)
        skip4 = _crop(self.score_pool4(pool4), self.crops["score_pool4"], *up2.shape[2:])
        up4 = self.upscore_pool4(up2 + skip4)
        skip3 = _crop(self.score_pool3(pool3), self.crops["score_pool3"], *up4.shape[2:])
        return _crop_output(self.upscore8(up4 + skip3), self.crops["upscore8"], x)


class FCN8sAtOnce(FCN8s):
    """FCN-8s trained at once from VGG16, with fixed scales on the skips: the release
    `fcn8s-atonce-pascal` (voc-fcn8s-atonce/net.py of fcn.berkeleyvision.org).

    The net is FCN-8s (same layers, names, shapes, crops; `state_dict` keys equal FCN8s's)
    except that pool4 is multiplied by 0.01 before score_pool4 and pool3 by 0.0001 before
    score_pool3: Caffe's `scale_pool4`/`scale_pool3` Scale layers, constant filler, lr_mult 0.
    Here they are the class constants `skip_scales`, not parameters or buffers, so optimizers,
    state dicts, `surgery.load_vgg16_backbone` and `surgery.transplant` see exactly FCN8s.

    Why: the journal version of the paper (Shelhamer, Long and Darrell, PAMI 2017) trains
    FCN-8s in one go from VGG16 instead of the staged 32s -> 16s -> 8s cascade (release solver:
    300k iterations, fixed lr 1e-10 on the unnormalised loss, momentum 0.99, batch 1). The
    pool3 and pool4 features are much larger than fc7's, which feeds score_fr. All score layers
    start at zero, but a score layer's weight gradient is proportional to its input, so
    unscaled skips would take much larger steps than score_fr at the one learning rate and
    their scores would dominate the fused prediction early on. Scaling their inputs by s
    (which scales their effective learning rate by s^2) makes the skip scores start small and
    grow slowly, so the whole net can be trained at once stably. The staged FCN-8s needs no
    scales: each skip joins a net already trained, at a 100x lower learning rate.
    """

    arch = "fcn8s_atonce"
    skip_scales: Mapping[str, float] = MappingProxyType({"pool4": 0.01, "pool3": 0.0001})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, score_fr = self._encode(x)
        s = self.skip_scales
        return self._decode(x, pool3 * s["pool3"], pool4 * s["pool4"], score_fr)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, skip_scales={dict(self.skip_scales)}"


NET_CLASSES: dict[str, type[_FCN]] = {
    "fcn32s": FCN32s,
    "fcn16s": FCN16s,
    "fcn8s": FCN8s,
    "fcn8s_atonce": FCN8sAtOnce,
}


def build_model(name: str, num_classes: int = 21, width: float = 1.0) -> nn.Module:
    """A fresh FCN: PyTorch-default convs, zero score layers, bilinear upsampling.

    Follow with `surgery.load_vgg16_backbone` (ImageNet init), `surgery.init_random` (from
    scratch) or `surgery.transplant` (from the previous stage).
    """
    if name not in NET_CLASSES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NET_CLASSES)}")
    return NET_CLASSES[name](num_classes=num_classes, width=width)


# --- model files -----------------------------------------------------------------------------

_RESERVED = ("arch", "num_classes", "width", "normalization", "state_dict")


class ModelFileError(ValueError):
    """A model file that is not one `save_model` wrote (or was damaged); names the path."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrap the real model.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_plain(value: Any, where: str) -> None:
    """Only what `torch.load(weights_only=True)` reads back: tensors and plain Python data."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: dict key {k!r} must be str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where}: {type(value).__name__} cannot go in a model file (only tensors, str, int, "
        "float, bool, None, lists and dicts: the file must load with weights_only=True)"
    )


def save_model(path: str | os.PathLike, model: nn.Module, **extra_meta: Any) -> None:
    """Write {"arch", "num_classes", "width", "normalization", "state_dict", **extra_meta}.

    `normalization` is `model.weights_normalization`: "imagenet" for the pipeline's own models
    (their files are what they always were), a dict for imported weights with an input adapter.
    Atomic (no half-written file on failure); CPU tensors and plain Python values only, so the
    file loads with `torch.load(path, weights_only=True)`.
    """
    model = _unwrap(model)
    if not isinstance(model, _FCN):
        raise TypeError(f"{path}: save_model wants an FCN model, got {type(model).__name__}")
    clash = sorted(set(extra_meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"{path}: extra metadata may not override {clash}")
    for k, v in extra_meta.items():
        _check_plain(v, f"{path}: {k}")
    payload = {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "width": model.width,
        "normalization": model.weights_normalization,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        **extra_meta,
    }
    # into an open file: given a path, torch names the zip root after the random temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def _unpickler_reason(e: Exception) -> str:
    # torch's message is a page of advice; the line naming the refused global is the news.
    lines = [ln.strip() for ln in str(e).splitlines()]
    hit = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
    return (hit[0] if hit else lines[0] if lines else type(e).__name__)[:300]


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild the model `save_model` wrote, in eval mode; extra metadata in `model.meta`.

    Reads with `weights_only=True`: a file that pickles arbitrary objects is refused, never run.
    A `normalization` other than "imagenet" must be a `CaffeInput.spec()`: the model gets that
    input adapter back and takes the pipeline's input like any other (ModelFileError otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"{path}: refused: the file pickles Python objects other than tensors and plain "
            f"data ({_unpickler_reason(e)}); only load model files written by save_model"
        ) from None
    except OSError:
        raise
    except Exception as e:  # torch raises many types on foreign bytes (KeyError, RuntimeError...)
        raise ModelFileError(f"{path}: not a torch model file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: expected a dict of model data, got {type(payload).__name__}")
    missing = [k for k in _RESERVED if k not in payload]
    if missing:
        raise ModelFileError(f"{path}: not a model file of this pipeline (missing {missing})")
    arch, num_classes, width = payload["arch"], payload["num_classes"], payload["width"]
    if arch not in NET_CLASSES:
        raise ModelFileError(f"{path}: unknown arch {arch!r}; valid: {', '.join(NET_CLASSES)}")
    adapter = None
    if payload["normalization"] != NORMALIZATION:
        try:
            adapter = CaffeInput.from_spec(payload["normalization"])
        except ValueError as e:
            raise ModelFileError(
                f"{path}: unknown input normalization ({e}); this pipeline feeds "
                f"{NORMALIZATION!r} and can adapt it to {CAFFE_BGR!r} only"
            ) from None
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict):
        raise ModelFileError(f"{path}: state_dict is a {type(state_dict).__name__}, not a dict")
    try:
        # Built on the meta device: no time spent initialising weights that are overwritten.
        with torch.device("meta"):
            model = build_model(arch, num_classes=num_classes, width=width)
        model.load_state_dict(state_dict, strict=True, assign=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: weights do not fit {arch} (width {width}): {e}") from None
    model.input_adapter = adapter  # no tensors: built off the meta device, fits any device
    model.meta = {k: v for k, v in payload.items() if k not in _RESERVED}
    return model.eval()
