"""ONNX export of a trained FCN, checked against PyTorch with onnxruntime before it is kept.

The ONNX model takes what the PyTorch one takes and gives what it gives, at any size:

    input  "image"   float32 [1, 3, H, W]   RGB in 0..1, ImageNet mean/std normalised
    output "logits"  float32 [1, 21, H, W]  class scores (argmax over dim 1: the label map)

H and W are dynamic. FCN pads conv1_1 by 100 and crops its skips and output at offsets that
are constants of the architecture (pipeline/models/fcn.py) but whose *ends* follow the input
size; the exporter is `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX through
onnxscript) with symbolic height and width, so those crop ends stay Shape-based in the graph
instead of being frozen at the example's size. `verify_onnx` proves it at several odd sizes.

A file is written only after onnxruntime agreed with PyTorch on at least `min_agreement` of
the argmax pixels of every check input; otherwise `OnnxMismatchError` names the worst input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_path

INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 18
MIN_AGREEMENT = 0.999
RANDOM_SIZES = ((97, 131), (203, 157))  # odd, and neither a multiple of 32 nor square
MAX_SIDE = 8192  # upper bound of the symbolic height and width


class OnnxMismatchError(RuntimeError):
    """onnxruntime and PyTorch disagree on more argmax pixels than allowed."""


def _cpu_fp32(model: nn.Module) -> nn.Module:
    return model.to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Export `model` (moved to the CPU, fp32, eval) to `path` as one self-contained ONNX file
    with dynamic height and width; not atomic by itself (`export_verified` is). Returns `path`.
    """
    import warnings

    model = _cpu_fp32(model)
    example = torch.zeros(1, 3, *RANDOM_SIZES[0])
    height = torch.export.Dim("height", min=1, max=MAX_SIDE)
    width = torch.export.Dim("width", min=1, max=MAX_SIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on the dynamic dims
        program = torch.onnx.export(
            model,
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({2: height, 3: width},),
            verbose=False,
        )
    path = Path(path)
    program.save(path, external_data=False)  # weights inside: one file for DVC to track
    strip_stack_traces(path)
    return path


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(path: str | os.PathLike) -> None:
    """Drop the exporter's per-node Python stack traces from the ONNX file at `path`.

    torch's dynamo exporter records, in each node's `metadata_props`, the stack trace of the
    code that produced it, with absolute source paths: two checkouts of the same commit would
    write different bytes, so DVC would see a changed output and cache a copy per checkout. The
    graph, weights and the other metadata are kept as they are.
    """
    import onnx

    model = onnx.load(str(path))

    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)

    strip(model.graph)
    for function in model.functions:
        keep_nodes = onnx.GraphProto(node=function.node)
        strip(keep_nodes)
        del function.node[:]
        function.node.extend(keep_nodes.node)
    onnx.save(model, str(path))


def check_inputs(
    val_images: Sequence[torch.Tensor] = (),
    val_keys: Sequence[str] | None = None,
    random_sizes: Sequence[tuple[int, int]] = RANDOM_SIZES,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Named [1,3,H,W] float32 inputs for `verify_onnx`: seeded normal noise at `random_sizes`,
    then each normalised val image [3,H,W], cropped by one row/column where needed so that both
    sides are odd (the case that trips exporters that freeze a crop size)."""
    g = torch.Generator().manual_seed(seed)
    out = {f"random_{h}x{w}": torch.randn(1, 3, h, w, generator=g) for h, w in random_sizes}
    keys = list(val_keys) if val_keys is not None else [str(i) for i in range(len(val_images))]
    for key, im in zip(keys, val_images, strict=True):
        h, w = im.shape[-2:]
        h, w = h - (1 - h % 2), w - (1 - w % 2)
        x = im.reshape(1, 3, *im.shape[-2:])[:, :, :h, :w].to(torch.float32).contiguous()
        out[f"val_{key}_{h}x{w}"] = x
    return out


def verify_onnx(
    model: nn.Module, onnx_path: str | os.PathLike, inputs: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Run each input through `model` (CPU, fp32) and the ONNX file (onnxruntime, CPU).

    Returns {"max_abs_diff", "argmax_agreement" (over all pixels), "min_argmax_agreement"
    (the worst input), "pixels", "checks": {name: {"height", "width", "max_abs_diff",
    "argmax_agreement"}}}. Raises ValueError when an output has the wrong shape.
    """
    import onnxruntime as ort

    model = _cpu_fp32(model)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    checks: dict[str, dict[str, Any]] = {}
    agree_total = pixels_total = 0
    worst_diff = 0.0
    for name, x in inputs.items():
        with torch.inference_mode():
            ref = model(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != ref.shape:
            raise ValueError(
                f"{onnx_path}: input {name} {tuple(x.shape)} gave logits {got.shape}, "
                f"PyTorch {ref.shape}: the exported sizes are not dynamic"
            )
        diff = float(np.abs(got - ref).max())
        agree = int((got.argmax(1) == ref.argmax(1)).sum())
        pixels = ref.shape[0] * ref.shape[2] * ref.shape[3]
        checks[name] = {
            "height": int(x.shape[2]),
            "width": int(x.shape[3]),
            "max_abs_diff": diff,
            "argmax_agreement": agree / pixels,
        }
        agree_total += agree
        pixels_total += pixels
        worst_diff = max(worst_diff, diff)
    if not checks:
        raise ValueError("verify_onnx needs at least one input")
    return {
        "max_abs_diff": worst_diff,
        "argmax_agreement": agree_total / pixels_total,
        "min_argmax_agreement": min(c["argmax_agreement"] for c in checks.values()),
        "pixels": pixels_total,
        "checks": checks,
    }


def require_agreement(report: Mapping[str, Any], min_agreement: float, what: str) -> None:
    """Raise OnnxMismatchError when an input of `verify_onnx`'s report agrees on fewer argmax
    pixels than `min_agreement` (a fraction); the message names `what` and the worst input."""
    name, worst = min(report["checks"].items(), key=lambda kv: kv[1]["argmax_agreement"])
    if worst["argmax_agreement"] < min_agreement:
        raise OnnxMismatchError(
            f"{what}: onnxruntime and PyTorch agree on {100 * worst['argmax_agreement']:.3f}% of "
            f"the argmax pixels of {name} (max |logit difference| {worst['max_abs_diff']:.3g}); "
            f"at least {100 * min_agreement:.3f}% is required. The ONNX file was not written."
        )


def export_verified(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Mapping[str, torch.Tensor],
    *,
    opset: int = OPSET,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """`export_onnx` to a temporary file beside `path`, `verify_onnx` on `inputs`, then rename
    it onto `path`; on `OnnxMismatchError` (or any error) no file is left. Returns the report.
    """
    with atomic_path(path, suffix=".onnx") as tmp:
        export_onnx(model, tmp, opset=opset)
        report = verify_onnx(model, tmp, inputs)
        require_agreement(report, min_agreement, str(path))
    return report


def versions() -> dict[str, str]:
    """Versions of what wrote and checked the files: torch, onnx, onnxruntime, onnxscript."""
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for dist in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def export_models(
    load_model: Callable[[str], nn.Module],
    names: Sequence[str],
    val_images: tuple[Sequence[torch.Tensor], Sequence[str]],
    onnx_dir: str | os.PathLike,
    *,
    opset: int = OPSET,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """The export_onnx stage's work: `export_verified` of each named model (loaded one at a
    time by `load_model(name)`) into onnx_dir/<name>.onnx, checked on `check_inputs(*val_images)`
    (normalised float [3, H, W] images and their keys); returns the reports/onnx_check.json report.

    Raises:
        OnnxMismatchError: a model's ONNX file disagrees with it (that file is not written;
            the models before it are kept).
    """
    inputs = check_inputs(*val_images)
    report: dict[str, Any] = {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "min_agreement": min_agreement,
        **versions(),
    }
    for name in names:
        target = Path(onnx_dir) / f"{name}.onnx"
        r = report[name] = export_verified(
            load_model(name), target, inputs, opset=opset, min_agreement=min_agreement
        )
        print(
            f"[export] {name} -> {target}: argmax agreement {100 * r['argmax_agreement']:.4f}%, "
            f"max |logit difference| {r['max_abs_diff']:.3g} over {len(inputs)} inputs",
            flush=True,
        )
    return report
