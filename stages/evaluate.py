"""DVC stage `evaluate`: score FCN-32s, FCN-16s and FCN-8s on VOC 2012 val (original resolution).

Reads models/<name>.pt and data/preprocessed/val; writes metrics/<name>.json (the DVC metrics:
pixel acc., mean acc., mean IU, f.w. IU, mean Dice), reports/tta/<name>.json,
plots/<name>/{per_class_iou.csv,confusion.png,qualitative.png} and reports/summary.md
(Table 2 of the paper: pixel acc., mean acc., mean IU, f.w. IU). Settings come from the
`evaluate` section of the active params profile: device, precision, batch_size,
qualitative_images.
"""

from __future__ import annotations

import sys

from pipeline.config import ARCHITECTURES, CASCADE, load_params
from pipeline.evaluation.settings import evaluate_config
from pipeline.inputs import stage_main, stage_parser


@stage_main()
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
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
                    default=list(CASCADE),
                    help="evaluate only these models (default: the three stages'; "
                    "fcn8s_atonce: an imported at-once release)")  # fmt: skip
    ap.add_argument(
        "--workers", type=int, default=2, help="decoding processes (default: %(default)s)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    cfg = evaluate_config(params)

    from pipeline.evaluation.evaluate import evaluate_models
    from pipeline.evaluation.summary import scored_set_name

    evaluate_models(
        cfg,
        scored_set_name(params),
        args.only,
        models_dir=args.models,
        val_dir=args.data,
        out_root=args.out,
        workers=args.workers,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
