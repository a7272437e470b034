"""DVC stage `evaluate`: score FCN-32s, FCN-16s and FCN-8s on VOC 2012 val (original resolution).

Reads models/<name>.pt and data/preprocessed/val; writes metrics/<name>.json, metrics/tta/,
plots/<name>/{per_class_iou.csv,confusion.png,qualitative.png} and reports/summary.md
(Table 2 of the paper: pixel acc., mean acc., mean IU, f.w. IU). Settings come from the
`evaluate` section of the active params profile: device, precision, batch_size,
qualitative_images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ARCHITECTURES, MODEL_NAMES, load_params
from pipeline.inputs import MissingInputsError, require_inputs


def val_set_name(params: dict) -> str:
    """What the val shards hold, said plainly: the sample's split is generated, not VOC."""
    if params["evaluate"]["split"] == "seg11valid":
        if params["evaluate"]["allow_partial_split"]:
            return (
                "the seg11valid images present in the val shards (a subset of the 736: "
                "not comparable with the paper's figures)"
            )
        return "seg11valid (736 images of PASCAL VOC 2011 val, none in SBD train)"
    if params["download"]["generate_sample"]:
        n = params["download"]["sample"]["voc_val"]
        return f"the generated sample's val split ({n} synthetic images in VOC 2012's layout)"
    return "PASCAL VOC 2012 val"


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
        "--out", default=".", help="root of metrics/, plots/, reports/ (default: %(default)s)"
    )
    ap.add_argument("--only", nargs="+", choices=ARCHITECTURES,
                    default=list(MODEL_NAMES),
                    help="evaluate only these models (default: the three stages'; "
                    "fcn8s_atonce: an imported at-once release)")  # fmt: skip
    ap.add_argument(
        "--workers", type=int, default=2, help="decoding processes (default: %(default)s)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params["evaluate"]
    models = Path(args.models)
    # fail before an hour of scoring, not after
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

    from pipeline.evaluation.evaluate import evaluate_all
    from pipeline.models.fcn import load_model

    # the training shards beside the val shards: scoring an image trained on is refused
    train_dir = Path(args.data).parent / "train"
    if not (train_dir / "index.json").is_file():
        print(f"[evaluate] no training shards in {train_dir}: train/val overlap not checked")
        train_dir = None

    evaluate_all(
        lambda name: load_model(models / f"{name}.pt", map_location="cpu"),
        args.only,
        args.data,
        args.out,
        device=cfg["device"],
        precision=cfg["precision"],
        batch_size=cfg["batch_size"],
        qualitative_images=cfg["qualitative_images"],
        workers=args.workers,
        progress=not args.no_progress,
        val_set=val_set_name(params),
        tta_flip=cfg["tta"]["flip"],
        tta_scales=cfg["tta"]["scales"],
        split=cfg["split"],
        train_dir=train_dir,
        allow_partial_split=cfg["allow_partial_split"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
