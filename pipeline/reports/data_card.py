"""The data card: what the models are trained and scored on, counted from the shards themselves.

Outputs of the `data_card` stage, written atomically and byte-identical on every run of the
same inputs (no timestamps, no paths of the machine, fixed orders):

    reports/data_card.md          images and labelled pixels per source and split, class pixel
                                  shares, what coco_to_voc and preprocess dropped and why, the
                                  COCO -> VOC rules next to torchvision's reference, the terms of
                                  each source
    plots/data/class_pixels.csv   source,split,class,pixels,share (share of the labelled pixels
                                  of that source and split; a grouped bar chart)
    reports/data_counts.json      {source: {split: {"images", "labelled_pixels"}}}
    metrics/data.json             {"train_images", "val_images"}: the DVC metrics, images per
                                  split over all sources (the counts that change results;
                                  flat and short so `dvc metrics show` stays narrow)

Counts (`pipeline.data.label_counts`) come from the label maps in `data/preprocessed/{train,val}` (what training and
evaluation read), not from the reports: a labelled pixel is one whose label is not 255. The
sources are the records' `meta["source"]`: `voc`, `coco` (COCO-VOC), `sbd` when present.
What was dropped comes from `data/coco_voc/report.json` and `data/preprocessed/report.json`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.classes import VOC_CLASSES
from pipeline.data.drop_reasons import coco_dropped, preprocess_dropped
from pipeline.data.label_counts import (
    SPLITS,
    count_dataset,
    count_groups,
    labelled_pixels,
)

SOURCE_NAMES = {
    "voc": "PASCAL VOC 2012",
    "coco": "COCO-VOC (COCO 2017, 20 VOC classes)",
    "sbd": "SBD (Semantic Boundaries Dataset)",
}
CARD = Path("reports/data_card.md")
CLASS_PIXELS_CSV = Path("plots/data/class_pixels.csv")
METRICS_JSON = Path("metrics/data.json")
COUNTS_JSON = Path("reports/data_counts.json")
_MAX_EXAMPLES = 10  # skipped preprocess inputs quoted in the card

# torchvision's reference converter, compared with pipeline/data/coco_voc.py in the card
TORCHVISION_REF = (
    "https://github.com/pytorch/vision/blob/main/references/segmentation/coco_utils.py"
)

# The published terms of each source: (data, terms, where they are stated).
TERMS: tuple[tuple[str, str, str, str], ...] = (
    (
        "coco",
        "COCO 2017 annotations",
        "Creative Commons Attribution 4.0 (CC BY 4.0), owned by the COCO Consortium",
        "https://cocodataset.org/#termsofuse",
    ),
    (
        "coco",
        "COCO 2017 images",
        "Flickr images; the COCO Consortium does not own their copyright, and their use must "
        "abide by the Flickr Terms of Use",
        "https://cocodataset.org/#termsofuse",
    ),
    (
        "voc",
        "PASCAL VOC 2012 images",
        "obtained from Flickr; their use must respect the corresponding Flickr terms of use",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (Database Rights)",
    ),
    (
        "voc",
        "PASCAL VOC 2012 annotations",
        "released by the VOC challenge organisers with the development kit, for research use",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    ),
    (
        "sbd",
        "SBD annotations (Hariharan et al., ICCV 2011)",
        "research use; the images are PASCAL VOC 2011 images (terms above)",
        "http://home.bharathh.info/pubs/codes/SBD/download.html",
    ),
)


# --- the plot and the metrics -----------------------------------------------------------------


def counts_json(counts: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict[str, dict]]:
    """{source: {split: {"images": n, "labelled_pixels": n}}} (ints), in `count_dataset`'s
    order: reports/data_counts.json, the per-source numbers of the card."""
    out: dict[str, dict] = {}
    for source, split, c in count_groups(counts):
        out.setdefault(source, {})[split] = {
            "images": c["images"],
            "labelled_pixels": labelled_pixels(c),
        }
    return out


def metrics_json(counts: Mapping[str, Mapping[str, Mapping]]) -> dict[str, int]:
    """The DVC metrics of the data, metrics/data.json: {"train_images": n, "val_images": n},
    the images of each split summed over the sources (0 for a split with none). Per-source
    counts and labelled pixels are in `counts_json` and the card."""
    out = {f"{split}_images": 0 for split in SPLITS}
    for _, split, c in count_groups(counts):
        out[f"{split}_images"] += c["images"]
    return out


def _share(pixels: int, total: int) -> float:
    return round(pixels / total, 8) if total else 0.0


def class_pixels_csv(
    counts: Mapping[str, Mapping[str, Mapping]], class_names: Sequence[str] = VOC_CLASSES
) -> str:
    """source,split,class,pixels,share: one row per class of each source and split; share is of
    that source and split's labelled pixels (the shares of one source and split sum to 1)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "split", "class", "pixels", "share"])
    for source, split, c in count_groups(counts):
        total = labelled_pixels(c)
        for name, pixels in zip(class_names, c["class_pixels"], strict=True):
            w.writerow([source, split, name, pixels, f"{_share(pixels, total):.8f}"])
    return buf.getvalue()


# --- the card ----------------------------------------------------------------------------------


def _n(v: int) -> str:
    return f"{v:,}"


def _pct(part: int, total: int) -> str:
    return f"{100 * part / total:.2f}%" if total else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: int = 1) -> list[str]:
    """A markdown table; columns from `right` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _source_label(source: str) -> str:
    return f"{source} ({SOURCE_NAMES[source]})" if source in SOURCE_NAMES else source


def _counts_section(counts: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    rows = []
    totals = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for source, split, c in count_groups(counts):
        lab = labelled_pixels(c)
        rows.append(
            [
                _source_label(source),
                split,
                _n(c["images"]),
                _n(lab),
                _n(c["ignore_pixels"]),
                _pct(lab - c["class_pixels"][0], lab),
            ]
        )
        totals[0][split] += c["images"]
        totals[1][split] += lab
        totals[2][split] += c["ignore_pixels"]
    for split in SPLITS:
        rows.append(
            ["**all sources**", split, _n(totals[0][split]), _n(totals[1][split]),
             _n(totals[2][split]), ""]
        )  # fmt: skip
    return [
        "## Images and labelled pixels",
        "",
        "Counted from the label maps in `data/preprocessed/{train,val}`: what training and "
        "evaluation read (train resized, val at original resolution). A labelled pixel is one "
        "whose label is not 255 (background included); ignore pixels are 255 (VOC object "
        "borders and difficult regions; in COCO-VOC crowd regions, different-class overlaps and "
        "unusable objects).",
        "",
        *_table(
            ["source", "split", "images", "labelled pixels", "ignore (255) pixels", "objects"],
            rows,
            right=2,
        ),
        "",
        "objects: share of the labelled pixels that are one of the 20 classes (not background).",
        "",
    ]


def _class_section(counts: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    groups = count_groups(counts)
    header = ["class", *(f"{source} {split}" for source, split, _ in groups)]
    rows = []
    for k, name in enumerate(VOC_CLASSES):
        rows.append([name, *(_pct(c["class_pixels"][k], labelled_pixels(c)) for _, _, c in groups)])
    return [
        "## Class pixel frequencies",
        "",
        "Share of each source and split's labelled pixels per class; the counts are in "
        f"`{CLASS_PIXELS_CSV.as_posix()}` (`dvc plots show` draws them as grouped bars).",
        "",
        *_table(header, rows),
        "",
    ]


def _coco_dropped_section(report: Mapping[str, Any] | None) -> list[str]:
    lines = ["### coco_to_voc (`data/coco_voc/report.json`)", ""]
    if not report:
        return [*lines, "No coco_to_voc report.", ""]
    splits = list(report.get("splits", {}))
    summary = []
    for label, key in (
        ("images in the annotation file", "images_total"),
        ("images kept", "images_kept"),
        ("annotations", "annotations_total"),
        ("annotations of the 20 VOC classes, used", "annotations_used_voc"),
        ("annotations of the other 60 categories (left as background)", "annotations_non_voc"),
        ("VOC-class annotations marked ignore (255)", "annotations_voc_marked_ignore"),
        ("annotations skipped (malformed)", "annotations_skipped"),
    ):
        summary.append([label, *(_n(int(report["splits"][s].get(key, 0))) for s in splits)])
    rows = [
        [what, f"`{reason}`", *(_n(by_split.get(s, 0)) for s in splits)]
        for what, reason, by_split in coco_dropped(report)
    ]
    return [
        *lines,
        *_table(["", *splits], summary),
        "",
        "By reason (every reason the converter knows, zeros included; the ids are in the report):",
        "",
        *_table(["what", "reason", *splits], rows, right=2),
        "",
    ]


def _preprocess_dropped_section(report: Mapping[str, Any] | None) -> list[str]:
    lines = ["### preprocess (`data/preprocessed/report.json`)", ""]
    if not report:
        return [*lines, "No preprocess report.", ""]
    skipped = report.get("skipped", [])
    lines.append(
        f"{_n(len(skipped))} of {_n(int(report.get('inputs', 0)))} input pairs skipped "
        f"(the stage fails above `preprocess.max_bad_fraction` = "
        f"{report.get('params', {}).get('max_bad_fraction', '?')})."
    )
    excluded = int(report.get("sbd_excluded_voc2012_val", 0))
    if excluded:  # preprocess.sbd: train_noval
        lines.append(
            f"{_n(excluded)} SBD train images left out of training because VOC 2012 val, "
            "which evaluation may score, holds them (`preprocess.sbd: train_noval`)."
        )
    lines.append("")
    if skipped:
        rows = [
            [split, source, reason, _n(n)]
            for split, source, reason, n in preprocess_dropped(report)
        ]
        lines += [*_table(["split", "source", "reason", "inputs"], rows, right=3), ""]
        lines.append("First skipped inputs:")
        lines.append("")
        for s in skipped[:_MAX_EXAMPLES]:
            lines.append(f"- `{s['key']}` ({s['split']}): {s['reason']}")
        if len(skipped) > _MAX_EXAMPLES:
            lines.append(f"- ... and {_n(len(skipped) - _MAX_EXAMPLES)} more in the report")
        lines.append("")
    return lines


def _rules_rows(n_non_voc: int, min_pixels: Any) -> list[list[str]]:
    """(rule, here, torchvision reference) rows of the COCO -> VOC rules table."""
    return [
        [
            "categories",
            "the 20 COCO categories of the VOC classes (ids and names checked), mapped to 1..20; "
            f"the other 60 are background ({_n(n_non_voc)} annotations)",
            "`FilterAndRemapCocoCategories`: the same 20 ids (`CAT_LIST`), remapped to 1..20; "
            "the other categories' annotations are dropped, so their pixels are background",
        ],
        [
            "crowd (`iscrowd=1`)",
            "every pixel of a crowd region of a VOC class is 255 (ignore)",
            "not told apart: a crowd mask is labelled with its class like any instance",
        ],
        [
            "overlapping instances",
            "same class: that class (their union); different classes: 255",
            "`ConvertCocoPolysToMask`: a pixel covered by more than one instance, of any "
            "classes, is 255 (`masks.sum(0) > 1`); elsewhere the instance's class (`max`)",
        ],
        [
            "unusable segmentations",
            "bad polygon parts dropped; an object with nothing usable is 255 over its box; an "
            "image with such an object and no box is dropped",
            "no check: the polygons go to pycocotools as they are",
        ],
        [
            "which images",
            f"an image with fewer than `min_pixels` = {min_pixels} labelled class 1..20 pixels "
            "after these rules (each pixel once) is dropped, in every split",
            "train only (`_coco_remove_images_without_annotations`): kept when the summed "
            "`area` of its VOC-class annotations is > 1000 (crowd included, overlaps counted "
            "twice); val is not filtered",
        ],
        [
            "splits",
            "train2017 and val2017 both go into training; evaluation is VOC val only",
            "train2017 trains, val2017 validates",
        ],
    ]


def _coco_split_summary(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """ "<split>: <kept> of <total> kept, <n> below min_pixels" for each coco_to_voc split."""
    few = {s: r["images_dropped"]["below_min_pixels"]["count"] for s, r in splits.items()}
    kept = {s: r["images_kept"] for s, r in splits.items()}
    total = {s: r["images_total"] for s, r in splits.items()}
    return ", ".join(
        f"{s}: {_n(kept[s])} of {_n(total[s])} kept, {_n(few[s])} below min_pixels" for s in splits
    )


def _rules_section(
    counts: Mapping[str, Mapping[str, Mapping]], coco_report: Mapping[str, Any] | None
) -> list[str]:
    splits = (coco_report or {}).get("splits", {})
    min_pixels = (coco_report or {}).get("params", {}).get("min_pixels")
    other = sum(r.get("annotations_non_voc", 0) for r in splits.values())
    ignore_coco = sum(c["ignore_pixels"] for c in counts.get("coco", {}).values())
    lab_coco = sum(labelled_pixels(c) for c in counts.get("coco", {}).values())
    per_split = _coco_split_summary(splits)
    rows = _rules_rows(other, min_pixels)
    return [
        "## COCO -> VOC rules, and torchvision's reference",
        "",
        f"`pipeline/data/coco_voc.py` against torchvision's `references/segmentation/coco_utils.py` "
        f"({TORCHVISION_REF}):",
        "",
        *_table(["", "here", "torchvision reference"], rows, right=99),
        "",
        f"Resulting counts: {per_split or 'no COCO splits'}; "
        f"{_n(ignore_coco)} ignore (255) pixels beside {_n(lab_coco)} labelled pixels in the "
        "COCO-VOC training shards.",
        "",
    ]


def _terms_section(counts: Mapping[str, Any], generate_sample: bool) -> list[str]:
    lines = ["## Licences and terms", ""]
    if generate_sample:
        lines += [
            "This run uses the generated sample (`download.generate_sample: true`): synthetic "
            "images and label maps drawn by `pipeline/data/sample.py`, packed like the real archives; "
            "no VOC, COCO or SBD image or annotation is in it. The terms below are those of the "
            "real data sets that the `full` profile downloads.",
            "",
        ]
    rows = [
        [what, terms, where, "yes" if source in counts and not generate_sample else "no"]
        for source, what, terms, where in TERMS
    ]
    return [
        *lines,
        *_table(["data", "terms, as the source states them", "source", "in this run"], rows, 99),
        "",
        "These are the terms as published by each source, quoted for reference; they are not "
        "legal advice. Images keep their own Flickr terms whatever the annotations' licence.",
        "",
    ]


def card_markdown(
    counts: Mapping[str, Mapping[str, Mapping]],
    coco_report: Mapping[str, Any] | None,
    preprocess_report: Mapping[str, Any] | None,
    *,
    generate_sample: bool,
) -> str:
    """reports/data_card.md: every number from `counts` (`count_dataset`) and the two reports."""
    lines = [
        "# Data card",
        "",
        "Written by the `data_card` stage (`pipeline/reports/data_card.py`) from `data/preprocessed` "
        "and the reports of `coco_to_voc` and `preprocess`; the same numbers are in "
        f"`{COUNTS_JSON.as_posix()}` and `{CLASS_PIXELS_CSV.as_posix()}` (images per split: "
        f"`{METRICS_JSON.as_posix()}`).",
        "",
        *_counts_section(counts),
        *_class_section(counts),
        "## Dropped and rejected",
        "",
        *_coco_dropped_section(coco_report),
        *_preprocess_dropped_section(preprocess_report),
        *_rules_section(counts, coco_report),
        *_terms_section(counts, generate_sample),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _read_json(path: Path | None) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    with open(path) as f:
        return json.load(f)


def write_data_card(
    preprocessed: str | Path,
    coco_report: str | Path | None,
    out_root: str | Path,
    *,
    generate_sample: bool,
    workers: int = 1,
) -> dict[str, dict[str, dict]]:
    """Count `preprocessed` and write the card, the class-pixel CSV, the per-source counts
    (`counts_json`) and the metrics (`metrics_json`) under `out_root` (each atomically);
    returns the counts (`count_dataset`).

    `coco_report` is coco_to_voc's report.json (None or a missing file: that section says so);
    preprocess's is `preprocessed/report.json`.
    """
    preprocessed, out_root = Path(preprocessed), Path(out_root)
    counts = count_dataset(preprocessed, workers)
    card = card_markdown(
        counts,
        _read_json(Path(coco_report) if coco_report is not None else None),
        _read_json(preprocessed / "report.json"),
        generate_sample=generate_sample,
    )
    atomic_write_text(out_root / CLASS_PIXELS_CSV, class_pixels_csv(counts))
    atomic_write_json(out_root / COUNTS_JSON, counts_json(counts))
    atomic_write_json(out_root / METRICS_JSON, metrics_json(counts))
    atomic_write_text(out_root / CARD, card)
    return counts
