"""Import a released Caffe FCN (.caffemodel) into a model file of this pipeline, without Caffe.

    python -m stages.import_caffe fcn8s-heavy-pascal.caffemodel --model fcn8s
    # -> models/imported/fcn8s.pt, scored like any model by
    python -m stages.evaluate --models models/imported --only fcn8s --out eval/imported

Not a DVC stage: the releases (fcn.berkeleyvision.org: fcn32s-heavy-pascal, fcn16s-heavy-pascal,
fcn8s-heavy-pascal .caffemodel) are downloaded by hand. The file written takes the pipeline's
input (RGB 0..1, ImageNet-normalised) and converts it to the releases' BGR 0..255 minus the
mean as its first op (its `normalization` field says so). fcn8s-atonce-pascal is refused: its
fixed scale layers on pool3/pool4 have no counterpart in this project's FCN-8s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import MODEL_NAMES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", type=Path, help="the .caffemodel file")
    ap.add_argument("--model", required=True, choices=MODEL_NAMES, help="the net it holds")
    ap.add_argument(
        "--out", type=Path, help="model file to write (default: models/imported/<model>.pt)"
    )
    args = ap.parse_args(argv)
    out = args.out or Path("models/imported") / f"{args.model}.pt"

    from pipeline.caffe_import import import_caffemodel

    try:
        model = import_caffemodel(args.src, args.model, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"[import_caffe] {args.src} -> {out}: {args.model}, {model.num_classes} classes, "
        f"width {model.width}, input {model.weights_normalization}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
