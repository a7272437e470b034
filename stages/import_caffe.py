"""Import a released Caffe FCN (.caffemodel) into a model file of this pipeline, without Caffe.

    # one command: import, then score on the active profile's val shards (`paper`: seg11valid)
    python -m stages.import_caffe fcn8s-heavy-pascal.caffemodel --model fcn8s --evaluate
    # -> models/imported/fcn8s.pt, eval/imported/{metrics,plots,reports/summary.md}

    python -m stages.import_caffe fcn8s-heavy-pascal.caffemodel --model fcn8s
    # -> models/imported/fcn8s.pt, scored like any model by
    python -m stages.evaluate --models models/imported --only fcn8s --out eval/imported
    python -m stages.import_caffe fcn8s-atonce-pascal.caffemodel --model fcn8s_atonce
    # -> models/imported/fcn8s_atonce.pt

Not a DVC stage: the releases (fcn.berkeleyvision.org: fcn32s-heavy-pascal, fcn16s-heavy-pascal,
fcn8s-heavy-pascal, fcn8s-atonce-pascal .caffemodel) are downloaded by hand. The file written
takes the pipeline's input (RGB 0..1, ImageNet-normalised) and converts it to the releases' BGR
0..255 minus the mean as its first op (its `normalization` field says so). fcn8s-atonce-pascal
is FCN-8s trained at once, with fixed scales on pool4/pool3 before the skip scores: import it
with --model fcn8s_atonce (the two FCN-8s files are told apart by its Scale layers, and the
wrong --model for either is refused with the right one named).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ARCHITECTURES

# The staged nets and the at-once FCN-8s: the keys of pipeline.models.MODELS, named in
# pipeline.config so that --help need not import torch (tests check the two agree).
MODEL_CHOICES = ARCHITECTURES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", type=Path, help="the .caffemodel file")
    ap.add_argument("--model", required=True, choices=MODEL_CHOICES, help="the net it holds")
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
    args = ap.parse_args(argv)
    out = args.out or Path("models/imported") / f"{args.model}.pt"
    if args.evaluate and out.name != f"{args.model}.pt":
        print(f"error: --evaluate reads <dir>/{args.model}.pt; --out {out} is named otherwise")
        return 2

    from pipeline.models.caffe_import import import_caffemodel

    try:
        model = import_caffemodel(args.src, args.model, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"[import_caffe] {args.src} -> {out}: {args.model}, {model.num_classes} classes, "
        f"width {model.width}, input {model.weights_normalization}"
    )
    if args.evaluate:
        from stages.evaluate import main as evaluate

        return evaluate(
            ["--params", args.params, "--models", str(out.parent), "--only", args.model,
             "--out", args.eval_out]
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
