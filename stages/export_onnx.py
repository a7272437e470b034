"""DVC stage `export_onnx`: models/<name>.pt -> models/onnx/<name>.onnx, checked by onnxruntime.

Each ONNX file takes "image" float32 [1,3,H,W] (RGB 0..1, ImageNet-normalised) and gives
"logits" float32 [1,21,H,W], H and W dynamic. Before a file is kept, onnxruntime (CPU) and
PyTorch run the same inputs: seeded noise at 97x131 and 203x157 and the first val images,
cropped to odd sizes. The max |logit difference| and argmax pixel agreement of each go to
metrics/onnx.json; the stage fails, naming the input, when an agreement is below
`export.min_agreement` of the active params profile (opset and val images are there too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import MODEL_NAMES, load_params
from pipeline.inputs import MissingInputsError, require_inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    ap.add_argument(
        "--data", default="data/preprocessed/val", help="val shard dir (default: %(default)s)"
    )
    ap.add_argument(
        "--models", default="models", help="where <name>.pt are read (default: %(default)s)"
    )
    ap.add_argument(
        "--onnx", default="models/onnx", help="where <name>.onnx go (default: %(default)s)"
    )
    ap.add_argument(
        "--metrics", default="metrics/onnx.json", help="the check's report (default: %(default)s)"
    )
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                    help="export only these models (default: all three)")  # fmt: skip
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params["export"]
    models = Path(args.models)
    try:
        require_inputs(
            {
                **{models / f"{n}.pt": (f"train_{n}", "model file") for n in args.only},
                Path(args.data) / "index.json": ("preprocess", "val shards"),
            }
        )
    except MissingInputsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from pipeline.atomic import atomic_write_json
    from pipeline.inference.export import OnnxMismatchError, check_inputs, export_verified, versions
    from pipeline.inference.speed import load_val_images
    from pipeline.models.fcn import load_model

    images, keys = load_val_images(args.data, cfg["val_images"])
    inputs = check_inputs(images, keys)
    report = {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": cfg["opset"],
        "min_agreement": cfg["min_agreement"],
        **versions(),
    }
    for name in args.only:
        model = load_model(models / f"{name}.pt", map_location="cpu")
        target = Path(args.onnx) / f"{name}.onnx"
        try:
            report[name] = export_verified(
                model, target, inputs, opset=cfg["opset"], min_agreement=cfg["min_agreement"]
            )
        except OnnxMismatchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        r = report[name]
        print(
            f"[export] {name} -> {target}: argmax agreement {100 * r['argmax_agreement']:.4f}%, "
            f"max |logit difference| {r['max_abs_diff']:.3g} over {len(inputs)} inputs",
            flush=True,
        )
    atomic_write_json(args.metrics, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
