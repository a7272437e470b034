"""Import the released Caffe FCN weights (fcn.berkeleyvision.org) without Caffe.

    blobs = read_caffemodel("fcn8s-heavy-pascal.caffemodel")   # {layer name: [weight, bias]}
    model = fcn_from_caffe("fcn8s", blobs)                      # pipeline.models.FCN8s
    atonce = fcn_from_caffe("fcn8s_atonce", read_caffemodel("fcn8s-atonce-pascal.caffemodel"))

The byte format (schema, reading, writing, the checks for truncated files) is
`pipeline.models.caffe_proto`.

The layer names of the releases are those of this project's models (conv1_1 ... conv5_3, fc6,
fc7, score_fr, upscore, upscore2, score_pool4, upscore16, upscore_pool4, score_pool3, upscore8),
and Caffe's blob layouts are PyTorch's: Convolution weight [out, in, kh, kw] + bias [out];
Deconvolution weight [in, out/group, kh, kw] like ConvTranspose2d (no bias in the FCN nets).
The releases take BGR 0..255 minus `CAFFE_MEAN_BGR`; the imported model gets a `CaffeInput`
adapter as its first op, so it takes the pipeline's normalised RGB like any other model and
`evaluate`/`predict` use it unchanged (see pipeline.models.fcn).

FCN-8s at-once (fcn8s-atonce-pascal.caffemodel) scales pool4 by 0.01 and pool3 by 0.0001
(Scale layers `scale_pool4`, `scale_pool3`: constant filler, lr_mult 0) before the skip scores;
it imports as "fcn8s_atonce" (`pipeline.models.FCN8sAtOnce`, whose scales are fixed constants
of the class). The Scale layers' blob (one factor per channel) may be in the file or not: if it
is, it must hold the net's constant, or the import fails naming the layer. The two FCN-8s files
have the same weights otherwise, so the Scale layers tell them apart: an at-once file imported
as "fcn8s" (whose forward would skip the scales) and a staged (heavy) FCN-8s file imported as
"fcn8s_atonce" (whose forward would add them) are refused with the name to use instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.classes import NUM_CLASSES
from pipeline.config import ARCHITECTURES, load_params
from pipeline.inputs import stage_main
from pipeline.models.caffe_proto import (
    blob_fits,
    caffe_layer_names,
    file_label,
    file_sha256,
    read_caffemodel,
    truncation_hint,
)
from pipeline.models.fcn import CAFFE_MEAN_BGR, NET_CLASSES, CaffeInput, build_model, save_model
from pipeline.models.surgery import VGG16_CFG

# The at-once release's Scale layers, named after the pool they scale (FCN8sAtOnce.skip_scales)
ATONCE_LAYERS = ("scale_pool4", "scale_pool3")
# Relative tolerance on a Scale blob's constant: a few float32 ulps (eps 1.2e-7)
SCALE_RTOL = 1e-6

# --- into the model --------------------------------------------------------------------------


def _layer_plan(model: nn.Module) -> dict[str, nn.Module]:
    """{Caffe layer name: module} of every conv / transposed conv of an FCN."""
    modules = dict(model.named_modules())
    plan = {caffe: modules[name] for caffe, name in caffe_layer_names().items()}
    for name, m in modules.items():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and not name.startswith("features"):
            plan[name] = m
    return plan


def _infer_size(blobs: dict[str, list[np.ndarray]]) -> tuple[int, float]:
    """(num_classes, width) from score_fr's and conv1_1's weights (VGG16: conv1_1 has 64)."""
    for layer in ("conv1_1", "score_fr"):
        if not blobs.get(layer):
            raise ValueError(f"layer {layer!r} missing from the caffemodel (or has no blobs)")
    # both are 4-D conv weights [out, in, kh, kw], in legacy files too
    return int(blobs["score_fr"][0].shape[0]), blobs["conv1_1"][0].shape[0] / VGG16_CFG[0]


class ClassCountError(ValueError):
    """A caffemodel that scores another number of classes than asked for (names both)."""


def _refuse_early(
    name: str, blobs: dict[str, list[np.ndarray]], num_classes: int | None, where: str
) -> None:
    """The refusals about the file as a whole, before any model is built (`where` names it): an
    FCN-8s at-once file for another net; a file cut after a complete layer (`truncation_hint`
    over the net's weight layers in the release's order, which is `_layer_plan`'s); a score_fr
    with another class count than `num_classes` (ClassCountError)."""
    atonce = [n for n in ATONCE_LAYERS if n in blobs]
    if atonce and not NET_CLASSES[name].skip_scales:
        raise ValueError(
            f"{where}: the caffemodel has the Scale layers {atonce} (fixed scales 0.01 on pool4 "
            "and 0.0001 on pool3 before the skip scores): it is the FCN-8s at-once release "
            "(fcn8s-atonce-pascal); import it as 'fcn8s_atonce'"
        )
    with torch.device("meta"):  # the layer order only: no weights made
        order = list(_layer_plan(build_model(name)))
    hint = truncation_hint(blobs, order) if any(n not in blobs for n in order) else None
    if hint:
        missing = [n for n in order if n not in blobs]
        raise ValueError(f"{where}: layers missing from the caffemodel: {missing}; {hint}")
    found = _infer_size(blobs)[0] if num_classes is not None else None
    if found is not None and found != num_classes:
        raise ClassCountError(
            f"{where}: the caffemodel scores {found} classes (score_fr has {found} outputs), "
            f"not {num_classes}: refused before importing"
        )


def _check_scale_blobs(
    name: str, model: nn.Module, blobs: dict[str, list[np.ndarray]]
) -> list[str]:
    """Check the Scale layers of an at-once file against `model.skip_scales`; their names.

    Each layer must be in the file; its blob, if any, is one value per channel of the pool it
    scales (Caffe's Scale on axis 1), equal to the class constant up to `SCALE_RTOL`.
    """
    layers = {f"scale_{pool}": (pool, s) for pool, s in model.skip_scales.items()}
    absent = [layer for layer in layers if layer not in blobs]
    if len(absent) == len(layers):
        raise ValueError(
            f"{name}: the caffemodel has no {' / '.join(layers)} layers, so it is not the FCN-8s "
            "at-once release but the staged FCN-8s (fcn8s-heavy-pascal): import it as 'fcn8s'"
        )
    if absent:
        raise ValueError(f"{name}: Scale layers missing from the caffemodel: {absent}")
    for layer, (pool, scale) in layers.items():
        want = (getattr(model, f"score_{pool}").in_channels,)
        found = [tuple(b.shape) for b in blobs[layer]]
        if not found:  # lr_mult 0: the file may leave the constant to the net definition
            continue
        if len(found) != 1:
            raise ValueError(
                f"{name}: layer {layer!r} has {len(found)} blobs {found}, expected the scale "
                f"{want} alone (or no blob)"
            )
        if not blob_fits(found[0], want):
            raise ValueError(
                f"{name}: layer {layer!r} scale blob has shape {found[0]}, expected {want}"
            )
        b = blobs[layer][0]
        if not np.allclose(b, np.float32(scale), rtol=SCALE_RTOL, atol=0):
            raise ValueError(
                f"{name}: layer {layer!r} holds scales in [{b.min():.6g}, {b.max():.6g}], "
                f"expected the constant {scale} on {pool} of the at-once net (a fixed Scale, "
                "lr_mult 0); this file is not the fcn8s-atonce release"
            )
    return list(layers)


def _params_of(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [("weight", m.weight)] + ([("bias", m.bias)] if m.bias is not None else [])


def _checked_copies(
    name: str, layer: str, m: nn.Module, blobs: dict[str, list[np.ndarray]], where: str
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(parameter, blob) pairs of one layer, after checking the blobs' count, shapes (`where`:
    the model's width and classes, for the message) and finiteness; raises ValueError."""
    params = _params_of(m)
    want = [tuple(p.shape) for _, p in params]
    found = [tuple(b.shape) for b in blobs[layer]]
    if len(found) != len(want):
        raise ValueError(
            f"{name}: layer {layer!r} has {len(found)} blobs {found}, expected "
            f"{len(want)} ({', '.join(k for k, _ in params)}) {want}"
        )
    for (kind, _), w, f, b in zip(params, want, found, blobs[layer], strict=True):
        if not blob_fits(f, w):
            raise ValueError(
                f"{name}: layer {layer!r} {kind} blob has shape {f}, expected {w} ({where})"
            )
        if not np.isfinite(b).all():
            raise ValueError(f"{name}: layer {layer!r} {kind} blob has NaN or infinite values")
    return [(p, b) for (_, p), b in zip(params, blobs[layer], strict=True)]


@torch.no_grad()
def fcn_from_caffe(
    name: str,
    blobs: dict[str, list[np.ndarray]],
    *,
    num_classes: int | None = None,
    width: float | None = None,
    source: str | None = None,
) -> nn.Module:
    """`build_model(name, num_classes, width)` holding the Caffe blobs, with a `CaffeInput` adapter.

    `blobs` as from `read_caffemodel`. Each layer of the model is filled from the Caffe layer of
    the same name (`conv1_1` ... `conv5_3` for `features.N`); every blob's shape is checked
    against the model before anything is copied. `num_classes` and `width` default to what the
    blobs say (score_fr's outputs; conv1_1's outputs / 64): the releases are 21 classes, width
    1.0. The model returned is in eval mode and takes the pipeline's normalised RGB input (the
    adapter converts it to the releases' BGR 0..255 minus `CAFFE_MEAN_BGR`).

    "fcn8s_atonce" wants the file's `scale_pool4`/`scale_pool3` layers; their blobs, if present,
    must hold the model's fixed scales (0.01, 0.0001), which are not copied (class constants).

    `source` (e.g. `file_label(path)`) names the file in the errors. Before any model is built:
    ClassCountError (a ValueError) for a score_fr of another `num_classes` than given;
    ValueError for a file holding only the net's first weight layers, in order ("truncated").

    Raises ValueError naming the layer for a missing layer, a missing or extra blob, a blob of
    the wrong shape (expected and found shapes), non-finite values or a Scale blob that is not
    the at-once constant; naming the model to use for an at-once file imported as another model
    or a staged FCN-8s file imported as "fcn8s_atonce"; and for a layer with weights that the
    model has no place for.
    """
    if name not in NET_CLASSES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NET_CLASSES)}")
    label = f"{name}: {source}" if source else name
    _refuse_early(name, blobs, num_classes, label)
    inferred = _infer_size(blobs) if num_classes is None or width is None else (0, 0.0)
    num_classes = inferred[0] if num_classes is None else num_classes
    width = inferred[1] if width is None else width
    model = build_model(name, num_classes=num_classes, width=width)
    plan = _layer_plan(model)
    missing = [
        f"{layer!r} (expected blobs {[tuple(p.shape) for _, p in _params_of(m)]})"
        for layer, m in plan.items()
        if layer not in blobs
    ]
    if missing:
        raise ValueError(f"{label}: layers missing from the caffemodel: {'; '.join(missing)}")
    scale_layers = _check_scale_blobs(name, model, blobs) if model.skip_scales else []
    where = f"width {width}, {num_classes} classes"
    copies = [c for layer, m in plan.items() for c in _checked_copies(name, layer, m, blobs, where)]
    unused = sorted(k for k, v in blobs.items() if v and k not in plan and k not in scale_layers)
    if unused:
        raise ValueError(
            f"{name}: the caffemodel has weights for layers {unused} that {name} lacks"
        )
    for p, b in copies:
        p.copy_(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).reshape(p.shape))
    model.input_adapter = CaffeInput(CAFFE_MEAN_BGR)
    return model.eval()


def import_caffemodel(
    src: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    *,
    num_classes: int | None = None,
    expected_size: int | None = None,
) -> nn.Module:
    """Read `src`, build `name` from it (`fcn_from_caffe`) and `save_model` it to `out`.

    The file records where the weights came from: `imported_from` (file name) and
    `source_sha256` of the caffemodel. Atomic (save_model). Returns the model. `num_classes`:
    refuse (ClassCountError, nothing written) a net scoring another number of classes;
    `expected_size`: the caffemodel's size in bytes, when known (see `read_caffemodel`).
    """
    src = Path(src)
    blobs = read_caffemodel(src, expected_size=expected_size)
    source = file_label(src, expected_size)
    model = fcn_from_caffe(name, blobs, num_classes=num_classes, source=source)
    save_model(out, model, imported_from=src.name, source_sha256=file_sha256(src))
    return model


# --- the fcn-import-caffe command ------------------------------------------------------------

CLI_HELP = """Import a released Caffe FCN (.caffemodel) into a model file of this pipeline, without Caffe.

    # one command: import, then score on the active profile's val shards (`paper`: seg11valid)
    fcn-import-caffe fcn8s-heavy-pascal.caffemodel --model fcn8s --evaluate
    # -> models/imported/fcn8s.pt, eval/imported/{metrics,plots,reports/summary.md}

    fcn-import-caffe fcn8s-heavy-pascal.caffemodel --model fcn8s
    # -> models/imported/fcn8s.pt, scored like any model by
    python -m stages.evaluate --models models/imported --only fcn8s --out eval/imported
    fcn-import-caffe fcn8s-atonce-pascal.caffemodel --model fcn8s_atonce
    # -> models/imported/fcn8s_atonce.pt

The releases (fcn.berkeleyvision.org: fcn32s-heavy-pascal, fcn16s-heavy-pascal,
fcn8s-heavy-pascal, fcn8s-atonce-pascal .caffemodel) are downloaded by hand. The file written
takes the pipeline's input (RGB 0..1, ImageNet-normalised) and converts it to the releases' BGR
0..255 minus the mean as its first op (its `normalization` field says so). fcn8s-atonce-pascal
is FCN-8s trained at once, with fixed scales on pool4/pool3 before the skip scores: import it
with --model fcn8s_atonce (the two FCN-8s files are told apart by its Scale layers, and the
wrong --model for either is refused with the right one named). A net of other classes than
VOC's 21 (the PASCAL-Context release: 60) is refused by --evaluate and imported, with a note,
without it. A truncated download is named as such, with the file's size.
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fcn-import-caffe",
        description=CLI_HELP,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("src", type=Path, help="the .caffemodel file")
    ap.add_argument("--model", required=True, choices=ARCHITECTURES, help="the net it holds")
    ap.add_argument(
        "--out", type=Path, help="model file to write (default: models/imported/<model>.pt)"
    )
    ap.add_argument(
        "--evaluate",
        action="store_true",
        help="then score it with the evaluate stage's code on the val shards of the active "
        "profile (data/preprocessed/val; evaluate.split picks VOC 2012 val or seg11valid)",
    )
    ap.add_argument(
        "--params", default="params.yaml", help="with --evaluate (default: %(default)s)"
    )
    ap.add_argument(
        "--eval-out",
        default="eval/imported",
        help="with --evaluate: root of its metrics/, plots/, reports/ (default: %(default)s)",
    )
    return ap


@stage_main()
def main(argv: list[str] | None = None) -> int:
    """`fcn-import-caffe`: exit status 0, 1 (a file missing or refused, a bad params file) or
    2 (usage: --evaluate with an --out not named <model>.pt)."""
    args = _parser().parse_args(argv)
    out = args.out or Path("models/imported") / f"{args.model}.pt"
    if args.evaluate and out.name != f"{args.model}.pt":
        print(f"error: --evaluate reads <dir>/{args.model}.pt; --out {out} is named otherwise")
        return 2
    # --evaluate scores the VOC classes: a net of other classes is refused before any work
    want = NUM_CLASSES if args.evaluate else None
    try:
        model = import_caffemodel(args.src, args.model, out, num_classes=want)
    except ClassCountError as e:
        print(
            f"error: {e}; --evaluate scores the {NUM_CLASSES} PASCAL VOC classes (import "
            "without --evaluate to get the model file alone)",
            file=sys.stderr,
        )
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"[import_caffe] {args.src} -> {out}: {args.model}, {model.num_classes} classes, "
        f"width {model.width}, input {model.weights_normalization}"
    )
    if model.num_classes != NUM_CLASSES:
        print(
            f"[import_caffe] note: {model.num_classes} classes, not the {NUM_CLASSES} PASCAL VOC "
            "classes: this pipeline's evaluate and predict cannot score the file written"
        )
    if args.evaluate:
        from pipeline.evaluation.evaluate import evaluate_models
        from pipeline.evaluation.settings import evaluate_config
        from pipeline.evaluation.summary import scored_set_name

        params = load_params(args.params)
        evaluate_models(
            evaluate_config(params),
            scored_set_name(params),
            [args.model],
            models_dir=out.parent,
            out_root=args.eval_out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
