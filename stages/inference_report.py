"""DVC stage `inference_report`: speed, memory and size of each model, and its model card.

Reads models/<name>.pt, data/preprocessed/val and metrics/<name>.json (the `evaluate` stage's);
writes reports/inference/<name>.json (img/s, p50/p95 latency at 500x500 and at the val images'
own sizes, peak memory, parameters, GFLOPs, the machine), reports/model_cards/<name>.md and the
DVC metrics metrics/inference.json (images/s at 500x500 per model).
fp32, batch 1, on `evaluate.device`; warm-up, repeats and the number of val images come from
the `inference` section of the active params profile. Timings differ from run to run: they
live in this stage alone, so every other stage's outputs stay byte-identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import CASCADE, load_params
from pipeline.inputs import require_inputs, stage_main, stage_parser


@stage_main()
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument(
        "--data", default="data/preprocessed/val", help="val shard dir (default: %(default)s)"
    )
    ap.add_argument(
        "--models", default="models", help="where <name>.pt are read (default: %(default)s)"
    )
    ap.add_argument("--out", default=".", help="root of metrics/, reports/ (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=CASCADE, default=list(CASCADE),
                    help="report only these models (default: all three)")  # fmt: skip
    args = ap.parse_args(argv)

    params = load_params(args.params)
    models, out = Path(args.models), Path(args.out)
    require_inputs(
        {
            **{models / f"{n}.pt": (f"train_{n}", "model file") for n in args.only},
            **{out / "metrics" / f"{n}.json": ("evaluate", "metrics") for n in args.only},
            Path(args.data) / "index.json": ("preprocess", "val shards"),
        }
    )

    from pipeline.evaluation.settings import evaluate_config
    from pipeline.evaluation.summary import scored_set_name
    from pipeline.inference.settings import inference_config
    from pipeline.reports.model_card import card_recipe, write_inference_reports

    write_inference_reports(
        card_recipe(params),
        inference_config(params),
        evaluate_config(params).device,
        scored_set_name(params),
        args.only,
        models_dir=models,
        val_dir=args.data,
        out_root=out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
