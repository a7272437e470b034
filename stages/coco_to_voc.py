"""DVC stage `coco_to_voc`: COCO 2017 instances of the 20 VOC classes -> VOC label-map shards.

For each split in `coco_to_voc.splits` it reads `annotations/instances_<split>.json` from
`<raw-dir>/annotations_trainval2017.zip`, lists `<raw-dir>/<split>.zip` (image presence only,
nothing is decoded) and writes `<out>/<split>/` (shards: key = file stem, blob "label" = PNG
mode L, 0..20 and 255 = ignore) and `<out>/report.json` (per split: images kept, dropped per
reason, skipped annotations per reason with their ids, timings). Rules: pipeline/data/coco_voc.py.

A split where more than `coco_to_voc.max_rejected_fraction` of the annotations are rejected
(or of the images dropped for a fault) fails the stage (exit 1) with the count of each reason.
The whole `<out>` directory is replaced atomically: a failed run leaves the previous output (or
none), never a mix. The output does not depend on `coco_to_voc.workers`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python stages/coco_to_voc.py`: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic import atomic_dir, atomic_write_json, remove_path  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data.coco_voc import ID_LIST_CAP, CocoFormatError, convert_split  # noqa: E402
from pipeline.data.settings import CocoToVocConfig, coco_to_voc_config  # noqa: E402
from pipeline.inputs import require_inputs, stage_main, stage_parser  # noqa: E402

ANNOTATIONS_ZIP = "annotations_trainval2017.zip"


def run(c: CocoToVocConfig, raw_dir: Path, out: Path, progress: bool = True) -> dict:
    """Convert every split of `c` into `out` (atomically, as a whole); return the report."""
    require_inputs(
        {
            raw_dir / ANNOTATIONS_ZIP: "download_coco",
            **{raw_dir / f"{split}.zip": "download_coco" for split in c.splits},
        }
    )
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a killed run's leftovers, ours only
        remove_path(stale)
    t0 = time.perf_counter()
    report: dict = {
        "params": {
            "splits": list(c.splits),
            "min_pixels": c.min_pixels,
            "shard_size": c.shard_size,
            "max_rejected_fraction": c.max_rejected_fraction,
        },
        "id_list_cap": ID_LIST_CAP,
        "splits": {},
    }
    with atomic_dir(out) as tmp:
        for split in c.splits:
            report["splits"][split] = convert_split(
                raw_dir / ANNOTATIONS_ZIP,
                raw_dir / f"{split}.zip",
                split,
                tmp / split,
                min_pixels=c.min_pixels,
                workers=c.workers,
                shard_size=c.shard_size,
                progress=progress,
                max_rejected_fraction=c.max_rejected_fraction,
            )
        atomic_write_json(tmp / "report.json", reproducible(report))
    report["total_s"] = round(time.perf_counter() - t0, 3)
    return report


# Run-dependent fields stay out of report.json: the DVC output must hash the same on every run
# (and for any worker count); they are printed instead.
VOLATILE = ("timings_s", "images_per_s", "workers")


def reproducible(report: dict) -> dict:
    out = dict(report)
    out["splits"] = {
        s: {k: v for k, v in r.items() if k not in VOLATILE} for s, r in report["splits"].items()
    }
    return out


@stage_main(CocoFormatError)
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument(
        "--raw-dir",
        type=Path,
        default=Path("data/raw/coco"),
        help=f"folder with {ANNOTATIONS_ZIP} and <split>.zip (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("data/coco_voc"),
        help="output folder: <split>/ shard dirs + report.json (default: %(default)s)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    c = coco_to_voc_config(load_params(args.params))
    report = run(c, args.raw_dir, args.out, not args.no_progress)
    for split, r in report["splits"].items():
        dropped = {k: v["count"] for k, v in r["images_dropped"].items() if v["count"]}
        skipped = {
            k: v["count"] for k, v in r["annotations_skipped_by_reason"].items() if v["count"]
        }
        parts = {
            k: v["count"] for k, v in r["voc_objects_parts_dropped_by_reason"].items() if v["count"]
        }
        ignored = {
            k: v["count"] for k, v in r["voc_objects_marked_ignore_by_reason"].items() if v["count"]
        }
        print(
            f"coco_to_voc {split}: kept {r['images_kept']} of {r['images_total']} images "
            f"(dropped {dropped or 0}), skipped annotations {skipped or 0}, VOC objects with "
            f"parts dropped {parts or 0}, marked ignore {ignored or 0}, "
            f"{r['timings_s']['total']} s ({r['images_per_s']} img/s)"
        )
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
