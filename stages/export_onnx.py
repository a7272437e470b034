"""DVC stage `export_onnx`: models/<name>.pt -> models/onnx/<name>.onnx, checked by onnxruntime.

Each ONNX file takes "image" float32 [1,3,H,W] (RGB 0..1, ImageNet-normalised) and gives
"logits" float32 [1,21,H,W], H and W dynamic. Before a file is kept, onnxruntime (CPU) and
PyTorch run the same inputs: seeded noise at 97x131 and 203x157 and the first val images,
cropped to odd sizes. The max |logit difference| and argmax pixel agreement of each go to
reports/onnx_check.json (a plain output, not a DVC metric); the stage fails, naming the input,
when an agreement is below `export.min_agreement` of the active params profile (opset and val
images are there too).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import CASCADE, load_params
from pipeline.inference.export import OnnxMismatchError
from pipeline.inference.settings import export_config
from pipeline.inputs import require_inputs, stage_main, stage_parser


@stage_main(OnnxMismatchError)
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
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
        "--report",
        default="reports/onnx_check.json",
        help="the check's report (default: %(default)s)",
    )
    ap.add_argument("--only", nargs="+", choices=CASCADE, default=list(CASCADE),
                    help="export only these models (default: all three)")  # fmt: skip
    args = ap.parse_args(argv)

    cfg = export_config(load_params(args.params))
    models = Path(args.models)
    require_inputs(
        {
            **{models / f"{n}.pt": (f"train_{n}", "model file") for n in args.only},
            Path(args.data) / "index.json": ("preprocess", "val shards"),
        }
    )

    from pipeline.atomic import atomic_write_json
    from pipeline.inference.export import export_models
    from pipeline.inference.speed import load_val_images
    from pipeline.models.fcn import load_model

    report = export_models(
        lambda name: load_model(models / f"{name}.pt", map_location="cpu"),
        args.only,
        load_val_images(args.data, cfg.val_images),
        args.onnx,
        opset=cfg.opset,
        min_agreement=cfg.min_agreement,
    )
    atomic_write_json(args.report, report)  # only when every model passed its check
    return 0


if __name__ == "__main__":
    sys.exit(main())
