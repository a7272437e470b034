"""DVC stage `inference_report`: speed, memory and size of each model, and its model card.

Reads models/<name>.pt, data/preprocessed/val and metrics/<name>.json (the `evaluate` stage's);
writes metrics/inference/<name>.json (img/s, p50/p95 latency at 500x500 and at the val images'
own sizes, peak memory, parameters, GFLOPs, the machine) and reports/model_cards/<name>.md.
fp32, batch 1, on `evaluate.device`; warm-up, repeats and the number of val images come from
the `inference` section of the active params profile. Timings differ from run to run: they
live in this stage alone, so every other stage's outputs stay byte-identical.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--out", default=".", help="root of metrics/, reports/ (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                    help="report only these models (default: all three)")  # fmt: skip
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params["inference"]
    models, out = Path(args.models), Path(args.out)
    try:
        require_inputs(
            {
                **{models / f"{n}.pt": (f"train_{n}", "model file") for n in args.only},
                **{out / "metrics" / f"{n}.json": ("evaluate", "metrics") for n in args.only},
                Path(args.data) / "index.json": ("preprocess", "val shards"),
            }
        )
    except MissingInputsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from pipeline.atomic import atomic_write_json, atomic_write_text
    from pipeline.inference.speed import benchmark_model, load_val_images
    from pipeline.models.fcn import load_model
    from pipeline.reports.model_card import model_card
    from stages.evaluate import val_set_name

    images, _ = load_val_images(args.data, cfg["val_images"])
    val_set = val_set_name(params)
    for name in args.only:
        model = load_model(models / f"{name}.pt", map_location="cpu")
        report = benchmark_model(
            model,
            images,
            device=params["evaluate"]["device"],
            warmup=cfg["warmup"],
            repeats=cfg["repeats"],
        )
        metrics = json.loads((out / "metrics" / f"{name}.json").read_text())
        atomic_write_json(out / "metrics" / "inference" / f"{name}.json", report)
        atomic_write_text(
            out / "reports" / "model_cards" / f"{name}.md",
            model_card(name, params, metrics, report, val_set),
        )
        at = report["at_500x500"]
        print(
            f"[inference] {name}: {at['images_per_s']:.2f} img/s at 500x500, p50 "
            f"{at['latency_p50_ms']:.1f} ms, p95 {at['latency_p95_ms']:.1f} ms "
            f"({report['machine']})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
