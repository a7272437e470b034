"""The Caffe model zoo's VGG16, the net the FCN release started from, as a torchvision VGG16
state dict that `surgery.load_vgg16_backbone` takes unchanged; and the file that records its
input convention next to the weights.

    sd = vgg16_state_dict_from_caffe("VGG_ILSVRC_16_layers.caffemodel")  # features.N, classifier.N
    convert_caffe_vgg16("VGG_ILSVRC_16_layers.caffemodel", "data/raw/vgg16/vgg16_caffe.pth")
    sd, normalization = load_vgg16_weights(path)  # "imagenet" or CaffeInput().spec()

Facts, and where they come from:
- The layers (VGG_ILSVRC_16_layers_deploy.prototxt of the Caffe model zoo's VGG16 entry, gist
  ksimonyan/211839e770f7b538e2d8): Convolution conv1_1 ... conv5_3 (3x3, pad 1, outputs
  64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3, a 2x2 stride-2 max Pooling after each block),
  then InnerProduct fc6 (4096), fc7 (4096), fc8 (1000), ReLU after every conv, fc6 and fc7,
  Dropout 0.5 after fc6 and fc7, Softmax `prob`. Like that prototxt (V1 `layers { }` syntax),
  the caffemodel is in the old V1 format (NetParameter field 2), whose blobs are legacy 4-D:
  a weight (1, 1, out, in), a bias (1, 1, 1, out). `read_caffemodel` reads both formats.
- Blob layouts (BVLC Caffe's ConvolutionLayer, InnerProductLayer): a conv weight is
  [out, in, kh, kw], PyTorch's Conv2d layout; an InnerProduct weight is [out, in], `in` being
  its bottom blob flattened from axis 1 (C, H, W, row-major), which is `torch.flatten` on
  [N, C, H, W]: fc6 [4096, 512*7*7 = 25088] is torchvision's classifier.0 as it is, and
  `load_vgg16_backbone` reshapes it into the FCN's 7x7 fc6 conv [4096, 512, 7, 7].
- Input: BGR, 0..255, minus a mean pixel (the gist README: BGR [103.939, 116.779, 123.68]).
  The FCN release fine-tuned from these weights feeding its own mean, `CAFFE_MEAN_BGR`
  (voc_layers.py), which is what the converted file records (`CaffeInput()`): the FCN built on
  it gets that adapter and takes the pipeline's input like any model.
- The file's URL, size (553,432,081 bytes) and sha256 are the `paper` profile's
  `download.vgg16` pins in params.yaml (from OpenVINO open_model_zoo
  models/public/vgg16/model.yml; the same size in Caffe's own load logs); `download_vgg16`
  verifies them before converting.

Channels stay in Caffe's order (conv1_1's input channel 0 is blue): nothing is flipped, so the
dict must never go where ImageNet-normalised RGB is fed without the adapter. That is why the
converted file is not a plain state dict: `load_vgg16_weights` tells the two apart.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.models.caffe_proto import (
    blob_fits,
    caffe_layer_names,
    file_label,
    file_sha256,
    read_caffemodel,
    truncation_hint,
)
from pipeline.models.fcn import NORMALIZATION, CaffeInput
from pipeline.models.surgery import IMAGENET_CLASSES, vgg16_channels

VGG16_CAFFEMODEL = "VGG_ILSVRC_16_layers.caffemodel"
# `format` of the converted file: a plain torchvision state dict has no such key
CAFFE_VGG16_FORMAT = "fcn-pipeline/caffe-vgg16/v1"
# The classifier's layers, Caffe name -> torchvision's `classifier` Sequential index
_CLASSIFIER = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


def caffe_vgg16_layers() -> dict[str, str]:
    """{Caffe layer: torchvision module}, in the deploy prototxt's order: conv1_1 ->
    features.0, ..., conv5_3 -> features.28, fc6 -> classifier.0, fc7 -> .3, fc8 -> .6."""
    return {**caffe_layer_names(), **_CLASSIFIER}


def caffe_vgg16_shapes(width: float = 1.0) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{Caffe layer: (weight shape, bias shape)} of VGG16 at `width` (1.0: the released file),
    in Caffe's current (non-legacy) shapes, which are torchvision's: conv1_1 ((64, 3, 3, 3),
    (64,)), ..., fc6 ((4096, 25088), (4096,)), fc7 ((4096, 4096), (4096,)), fc8 ((1000,
    4096), (1000,)). Other widths scale every layer but fc8's 1000 outputs (as
    `surgery.random_vgg16_state_dict`). Raises ValueError for a width that is not > 0."""
    convs, fc = vgg16_channels(width)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    in_c = 3
    for layer, out_c in zip(caffe_layer_names(), convs, strict=True):
        shapes[layer] = ((out_c, in_c, 3, 3), (out_c,))
        in_c = out_c
    for layer, (n_out, n_in) in zip(
        _CLASSIFIER, ((fc, in_c * 7 * 7), (fc, fc), (IMAGENET_CLASSES, fc)), strict=True
    ):
        shapes[layer] = ((n_out, n_in), (n_out,))
    return shapes


def _check_layers(blobs: dict[str, list[np.ndarray]], source: str) -> None:
    """Every VGG16 layer present, none with weights that VGG16 lacks; ValueError otherwise."""
    order = list(caffe_vgg16_layers())
    missing = [layer for layer in order if layer not in blobs]
    if missing:
        hint = truncation_hint(blobs, order)
        if hint is None and "score_fr" in blobs:
            hint = "it holds score_fr: an FCN release? Import those with fcn-import-caffe"
        raise ValueError(
            f"{source}: layers missing from the caffemodel: {missing}; expected VGG16's "
            f"{', '.join(order)} (VGG_ILSVRC_16_layers_deploy.prototxt)"
            + (f"; {hint}" if hint else "")
        )
    extra = [k for k, v in blobs.items() if v and k not in order]
    if extra:
        raise ValueError(
            f"{source}: the caffemodel has weights for layers {extra} that VGG16 lacks "
            "(VGG19, or another net?)"
        )


def _infer_width(blobs: dict[str, list[np.ndarray]], source: str) -> float:
    """The width multiplier: conv1_1's outputs / 64 (VGG16_CFG[0])."""
    want = caffe_vgg16_shapes(1.0)["conv1_1"][0]
    found = tuple(blobs["conv1_1"][0].shape) if blobs["conv1_1"] else ()
    if len(found) != 4 or found[1:] != want[1:]:
        raise ValueError(
            f"{source}: layer 'conv1_1' weight blob has shape {found or None}, expected {want} "
            "(or fewer outputs, for a narrower net)"
        )
    return found[0] / want[0]


def vgg16_state_dict_from_blobs(
    blobs: dict[str, list[np.ndarray]], source: str = "caffemodel"
) -> dict[str, torch.Tensor]:
    """The torchvision-keyed VGG16 state dict of Caffe VGG16 blobs (from `read_caffemodel`).

    Returns {features.{0,2,5,...,28}.{weight,bias}, classifier.{0,3,6}.{weight,bias}}: float32,
    contiguous CPU tensors in `caffe_vgg16_shapes(width)`, `width` being conv1_1's outputs / 64
    (1.0 for the released file); classifier.0 is [4096, 25088] at width 1. Caffe's channel
    order is kept (BGR input). Legacy 4-D blobs are reshaped, nothing is transposed.

    Everything is checked before anything is converted. Raises ValueError naming `source` (the
    file) and the layer: a missing layer (saying, when the layers found are the first ones in
    order and nothing follows, that the file looks truncated), weights for a layer VGG16 lacks,
    a layer with other than 2 blobs (weight, bias), a blob whose shape is not the expected one
    (found and expected shapes, and the width), NaN or infinite values.
    """
    _check_layers(blobs, source)
    width = _infer_width(blobs, source)
    shapes = caffe_vgg16_shapes(width)
    for layer, want in shapes.items():
        found = [tuple(b.shape) for b in blobs[layer]]
        if len(found) != 2:
            raise ValueError(
                f"{source}: layer {layer!r} has {len(found)} blobs {found}, expected 2 "
                f"(weight, bias) {list(want)}"
            )
        for kind, f, w, b in zip(("weight", "bias"), found, want, blobs[layer], strict=True):
            if not blob_fits(f, w):
                raise ValueError(
                    f"{source}: layer {layer!r} {kind} blob has shape {f}, expected {w} "
                    f"(VGG16 at width {width:g}, from conv1_1)"
                )
            if not np.isfinite(b).all():
                raise ValueError(f"{source}: layer {layer!r} {kind} has NaN or infinite values")
    sd: dict[str, torch.Tensor] = {}
    for layer, module in caffe_vgg16_layers().items():
        for kind, w, b in zip(("weight", "bias"), shapes[layer], blobs[layer], strict=True):
            a = np.ascontiguousarray(b, dtype=np.float32).reshape(w)
            sd[f"{module}.{kind}"] = torch.from_numpy(a)
    return sd


def vgg16_state_dict_from_caffe(
    path: str | os.PathLike, *, expected_size: int | None = None
) -> dict[str, torch.Tensor]:
    """`vgg16_state_dict_from_blobs(read_caffemodel(path))`, errors naming the file and its size.

    `expected_size`: the file's size in bytes when known (the `paper` profile pins the
    released file's), checked before parsing. Raises FileNotFoundError, or ValueError (from
    `read_caffemodel`: a truncated or foreign file; from `vgg16_state_dict_from_blobs`).
    """
    blobs = read_caffemodel(path, expected_size=expected_size)
    return vgg16_state_dict_from_blobs(blobs, source=file_label(path, expected_size))


def save_caffe_vgg16(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str | None = None,
    source_sha256: str | None = None,
) -> None:
    """Write a converted state dict with its input convention, atomically (`atomic_path`).

    The file (`torch.save`, loads with weights_only=True) holds {"format": CAFFE_VGG16_FORMAT,
    "normalization": CaffeInput().spec(), "state_dict": {name: tensor}, "source": file name,
    "source_sha256": hex}. A plain torchvision state dict is a flat {name: tensor}, so the
    `format` key tells them apart (`load_vgg16_weights`). Raises TypeError for a state dict
    that is not {str: floating-point tensor}.
    """
    bad = [
        k
        for k, v in state_dict.items()
        if not (isinstance(v, torch.Tensor) and v.is_floating_point())
    ]
    if not state_dict or bad:
        raise TypeError(f"{path}: a state dict of floating-point tensors is wanted; bad: {bad}")
    payload = {
        "format": CAFFE_VGG16_FORMAT,
        "normalization": CaffeInput().spec(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "source": source,
        "source_sha256": source_sha256,
    }
    # into an open file: given a path, torch names the zip root after the random temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def convert_caffe_vgg16(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read the Caffe VGG16 `src`, convert it and `save_caffe_vgg16` it to `out`; returns it.

    `expected_size` (checked before parsing) and `expected_sha256` (after): ValueError naming
    the file, the found and the expected value, and nothing written. Other errors: `vgg16_state_dict_from_caffe`.
    """
    src = Path(src)
    sd = vgg16_state_dict_from_caffe(src, expected_size=expected_size)
    digest = file_sha256(src)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ValueError(
            f"{file_label(src)}: sha256 {digest}, expected {expected_sha256}: not the "
            "expected caffemodel (a damaged download, or another file)"
        )
    save_caffe_vgg16(out, sd, source=src.name, source_sha256=digest)
    return sd


def _converted(payload: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, normalization) of a `save_caffe_vgg16` payload; ValueError if malformed."""
    if payload["format"] != CAFFE_VGG16_FORMAT:
        raise ValueError(
            f"{path}: unknown weights format {payload['format']!r} (this pipeline reads "
            f"{CAFFE_VGG16_FORMAT!r} and plain torchvision state dicts)"
        )
    spec = payload.get("normalization")
    try:
        CaffeInput.from_spec(spec)
    except ValueError as e:
        raise ValueError(f"{path}: bad normalization in a converted Caffe VGG16: {e}") from None
    sd = payload.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: a converted Caffe VGG16 without a state dict of tensors")
    return sd, spec


def _unpickler_reason(e: Exception) -> str:
    # torch's message is a page of advice; the line after "WeightsUnpickler error:" is the news
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_vgg16_weights(
    path: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[dict[str, torch.Tensor], str | dict[str, Any]]:
    """(VGG16 state dict, the input its weights take) of a torchvision or converted file.

    A plain torchvision state dict ({name: tensor}, e.g. vgg16-397923af.pth) gives "imagenet"
    (RGB 0..1, ImageNet mean/std: what the pipeline feeds). A `save_caffe_vgg16` file gives
    its `normalization`, a `CaffeInput.spec()`: build the FCN's adapter with
    `CaffeInput.from_spec(spec)`. Either dict goes to `surgery.load_vgg16_backbone` as it is.
    Reads with weights_only=True. Raises FileNotFoundError, or ValueError naming the path for
    a file that is neither (or pickles other objects, or is not a torch file at all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VGG16 weights not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # foreign bytes, or pickled objects other than tensors
        raise ValueError(
            f"{path}: not a torch weights file that loads with weights_only=True "
            f"({_unpickler_reason(e)})"
        ) from None
    except OSError:
        raise
    except Exception as e:  # torch raises many types on foreign bytes
        raise ValueError(f"{path}: not a torch file ({type(e).__name__}: {e})") from None
    if isinstance(payload, dict) and isinstance(payload.get("format"), str):
        return _converted(payload, path)
    if (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        return dict(payload), NORMALIZATION
    raise ValueError(
        f"{path}: neither a torchvision VGG16 state dict ({{name: tensor}}) nor a converted "
        f"Caffe VGG16 ({CAFFE_VGG16_FORMAT!r}): got {type(payload).__name__}"
    )
