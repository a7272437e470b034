"""DVC stage `data_card`: what the models see, counted from data/preprocessed.

Writes reports/data_card.md (images and labelled pixels per source and split, class pixel
shares, what coco_to_voc and preprocess dropped and why, the COCO -> VOC rules next to
torchvision's reference, the terms of each source), plots/data/class_pixels.csv
(source,split,class,pixels,share), reports/data_counts.json (images and labelled pixels per
source and split) and metrics/data.json (images per split: the DVC metrics). Byte-identical on every run of the
same inputs. Reads `download.generate_sample` of the active params profile (whether the data
is the generated sample or the real data sets).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python stages/data_card.py`: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.data.label_counts import DataCardError  # noqa: E402
from pipeline.data.settings import download_config  # noqa: E402
from pipeline.inputs import require_inputs, stage_main, stage_parser  # noqa: E402
from pipeline.reports.data_card import (  # noqa: E402
    CARD,
    counts_json,
    write_data_card,
)


@stage_main(DataCardError)
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument(
        "--data",
        type=Path,
        default=Path("data/preprocessed"),
        help="preprocess output: train/, val/, report.json (default: %(default)s)",
    )
    ap.add_argument(
        "--coco-report",
        type=Path,
        default=Path("data/coco_voc/report.json"),
        help="coco_to_voc's report (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="root of reports/, plots/, metrics/ (default: .)",
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="label decoding processes (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    params = load_params(args.params)
    require_inputs(
        {
            args.data / "train" / "index.json": ("preprocess", "train shards"),
            args.data / "val" / "index.json": ("preprocess", "val shards"),
            args.data / "report.json": ("preprocess", "report"),
            args.coco_report: ("coco_to_voc", "report"),
        }
    )
    counts = write_data_card(
        args.data,
        args.coco_report,
        args.out,
        generate_sample=download_config(params).generate_sample,
        workers=args.workers,
    )
    for source, splits in counts_json(counts).items():
        shown = ", ".join(
            f"{split} {m['images']} images / {m['labelled_pixels']} labelled pixels"
            for split, m in splits.items()
        )
        print(f"data_card: {source}: {shown}")
    print(f"data_card: {args.out / CARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
