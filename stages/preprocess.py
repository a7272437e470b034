"""DVC stage `preprocess`: VOC 2012 (+ SBD, COCO's VOC classes) -> data/preprocessed/{train,val}.

train: VOC train.txt images (`preprocess.voc_train`), SBD's train list (`preprocess.sbd`: train,
or train_noval: without VOC 2012 val's images, counted in report.json) and, with
`preprocess.use_coco`, every COCO-VOC label record of the `coco_to_voc.splits`, resized so the longer side is at most `preprocess.max_size` (never
upscaled; label maps nearest-neighbour), as JPEG (`jpeg_quality`) + PNG shards.
val: VOC val.txt at original resolution, original bytes (scores use original label maps).
report.json lists every skipped input; the stage fails, writing nothing, when more than
`preprocess.max_bad_fraction` of the inputs are unusable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python stages/preprocess.py`: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.data.archives import ArchiveError  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402
from pipeline.data.preprocess_inputs import PreprocessError  # noqa: E402
from pipeline.data.sbd import SbdError  # noqa: E402
from pipeline.data.settings import coco_to_voc_config, preprocess_config  # noqa: E402
from pipeline.inputs import require_inputs, stage_main, stage_parser  # noqa: E402


def parser() -> argparse.ArgumentParser:
    """The stage's command line: the inputs' and the output's paths."""
    ap = stage_parser(__doc__)
    ap.add_argument(
        "--voc-tar",
        type=Path,
        default=Path("data/raw/voc/VOCtrainval_11-May-2012.tar"),
        help="VOC 2012 trainval tar (default: %(default)s)",
    )
    ap.add_argument(
        "--coco-voc",
        type=Path,
        default=Path("data/coco_voc"),
        help="coco_to_voc output, one shard dir per split (default: %(default)s)",
    )
    ap.add_argument(
        "--coco-dir",
        type=Path,
        default=Path("data/raw/coco"),
        help="folder of the COCO image zips <split>.zip (default: %(default)s)",
    )
    ap.add_argument(
        "--sbd-tgz",
        type=Path,
        default=Path("data/raw/sbd/benchmark.tgz"),
        help="SBD benchmark.tgz, read when preprocess.sbd is set (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("data/preprocessed"),
        help="output folder: train/, val/, report.json (default: %(default)s)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


@stage_main(PreprocessError, ArchiveError, SbdError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_params(args.params)
    p, c = preprocess_config(cfg), coco_to_voc_config(cfg)
    coco_splits = c.splits if p.use_coco else ()
    require_inputs(
        {
            args.voc_tar: ("download_voc", "VOC tar"),
            **({args.sbd_tgz: ("download_sbd", "SBD archive")} if p.sbd else {}),
            **{args.coco_voc / s / "index.json": "coco_to_voc" for s in coco_splits},
            **{args.coco_dir / f"{s}.zip": ("download_coco", "COCO zip") for s in coco_splits},
        }
    )
    report = preprocess(
        args.voc_tar,
        args.coco_voc,
        args.coco_dir,
        args.out,
        max_size=p.max_size,
        jpeg_quality=p.jpeg_quality,
        shard_size=p.shard_size,
        use_coco=p.use_coco,
        workers=p.workers,
        max_bad_fraction=p.max_bad_fraction,
        coco_splits=list(c.splits),
        voc_train=p.voc_train,
        sbd=p.sbd,
        sbd_tgz=args.sbd_tgz,
        progress=not args.no_progress,
    )
    print(
        f"preprocess: train {report['train']['records']} {report['train']['by_source']}, "
        f"val {report['val']['records']}, skipped {report['bad']} of {report['inputs']}, "
        f"SBD images left out as VOC 2012 val images {report['sbd_excluded_voc2012_val']} "
        f"(details: {args.out / 'report.json'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
