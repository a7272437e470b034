"""COCO 2017 instance annotations -> VOC-style semantic label maps: the coco_to_voc driver.

The paper trains on VOC; more data helps, so COCO objects of the 20 VOC classes are turned into
VOC label maps. The parts, each a module of named functions:

- `pipeline.data.coco_json`: the instances JSON, parsed streaming, and its `images` and
  `categories` checked (`CocoFormatError`);
- `pipeline.data.coco_annotations`: each annotation checked in two phases; a malformed one is
  skipped and counted (`SKIP_*` reasons), an unusable segmentation of a VOC-class object
  becomes an ignore region;
- `pipeline.data.coco_paint`: the VOC rules (crowd and overlap -> 255, one class -> it, else
  0), rasterization with pycocotools and the label PNG, run per image in the workers;
- this module: the split's plan (`plan_split`: one task per image), the rejected-share limit,
  the worker pool and the shard writer (`convert_split`); images with fewer than `min_pixels`
  pixels of classes 1..20 are dropped.

Scale (train2017: 118k images, 860k annotations, a ~450 MB JSON). The parent process parses
the JSON once, streaming the "annotations" array element by element: each annotation is
checked and reduced at once to a compact record, so the 860k dicts never coexist. After the
checks that need `images`/`categories` (`plan_split`), records are grouped into one task per
image. Workers (spawned: a fresh interpreter, none of the parent's memory) rasterize one union
per class per image, apply the rules and encode the PNG; the parent writes records in input
order, so the output is deterministic and independent of `workers`.

Peak memory: the JSON text twice while it is read and decoded (bytes + str, ~1.1 GB for 530
MB), then the text + compact records (~1 GB), plus ~70 MB per worker; whole-file json.load
would need ~3.6 GB (benchmarks/bench_coco_voc.py). Results stream to the shard files; the
pool's pipes bound the work in flight.

A split where more than `max_rejected_fraction` of the annotations are rejected (skipped or
marked ignore) or of the images are dropped for a fault raises `CocoRejectedError`.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.classes import IGNORE_INDEX, VOC_CLASSES
from pipeline.data.coco_annotations import (
    SEGMENTATION_REASONS,
    SKIP_REASONS,
    compact_annotation,
    finish_annotation,
    voc_class,
)
from pipeline.data.coco_json import (
    CocoFormatError,
    checked_category_ids,
    image_files_in_zip,
    index_images,
    read_instances_from_zip,
)
from pipeline.data.coco_paint import CROWD, convert_task, group_by_class
from pipeline.data.shards import ShardWriter

ID_LIST_CAP = 1000  # ids listed per reason in the report; the count is always complete

# Why an image is dropped.
DROP_MISSING_FILE = "missing_from_images_zip"
DROP_FEW_PIXELS = "below_min_pixels"
DROP_NO_REGION = "voc_object_without_region"  # unusable segmentation and no bbox
DROP_REASONS = (DROP_MISSING_FILE, DROP_FEW_PIXELS, DROP_NO_REGION)
FAULT_DROPS = (DROP_MISSING_FILE, DROP_NO_REGION)  # drops that count toward the rejected share


class CocoRejectedError(CocoFormatError):
    """Too much of a split was rejected (`max_rejected_fraction`); the message gives the counts."""


# --- the split --------------------------------------------------------------------------------


class _Reasons:
    """Counts and (capped) id lists per reason."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.counts = dict.fromkeys(reasons, 0)
        self.ids: dict[str, list] = {r: [] for r in reasons}

    def add(self, reason: str, ident: Any) -> None:
        self.counts[reason] += 1
        if len(self.ids[reason]) < ID_LIST_CAP:
            self.ids[reason].append(ident)

    def report(self) -> dict[str, dict]:
        return {
            r: {"count": n, "ids": self.ids[r], "ids_truncated": n > len(self.ids[r])}
            for r, n in self.counts.items()
        }


class _AnnotationTally:
    """What became of a split's annotations: reasons with their ids, and counts."""

    def __init__(self) -> None:
        self.skipped = _Reasons(SKIP_REASONS)
        self.repaired = _Reasons(SEGMENTATION_REASONS)  # VOC objects with polygon parts dropped
        self.ignored = _Reasons(SEGMENTATION_REASONS)  # VOC objects marked ignore (region)
        self.no_region: set[int] = set()  # images with a VOC object that nobody can place
        self.n_voc = self.n_other = self.n_ignored = 0

    def paint_entry(self, rec: tuple, finished: tuple) -> tuple[int, tuple] | None:
        """(image id, (category_id, iscrowd, segmentation)) to paint for one checked annotation
        (`finish_annotation`'s result), or None when nothing of it is painted; counts it."""
        reason, seg, ignore, dropped = finished
        if reason is not None:
            self.skipped.add(reason, rec[0])
            return None
        ident, image_id, cat, crowd = rec[:4]
        if not voc_class(cat):
            self.n_other += 1
            return None
        if ignore is not None:  # nothing usable: its region is ignore, never background
            self.n_ignored += 1
            self.ignored.add(ignore, ident)
            if seg is None:
                self.no_region.add(image_id)
                return None
            if not seg:  # the region lies outside the image
                return None
            crowd = 1
        else:
            self.n_voc += 1
            for r in dict.fromkeys(dropped):
                self.repaired.add(r, ident)
        return image_id, (cat, crowd, seg)

    def stats(self, n_anns: int) -> dict[str, int]:
        """Annotation counts of the report; every annotation is in exactly one of the four."""
        return {
            "annotations_total": n_anns,
            "annotations_used_voc": self.n_voc,
            "annotations_non_voc": self.n_other,
            "annotations_voc_marked_ignore": self.n_ignored,
            "annotations_skipped": n_anns - self.n_voc - self.n_other - self.n_ignored,
        }


def _missing_images(images: list[tuple], present_files: set[str] | None) -> set[int]:
    """Ids of the images whose file is not in the images zip (none when not checked)."""
    if present_files is None:
        return set()
    return {iid for iid, name, _h, _w in images if name not in present_files}


def _paint_entries_per_image(
    anns: list,
    images: list[tuple],
    category_ids: set[int],
    missing: set[int],
    tally: _AnnotationTally,
) -> list[list | None]:
    """Per image slot, the (category_id, iscrowd, segmentation) entries to paint (None: none).

    Empties `anns` as it goes: each record is freed as soon as it is checked.
    """
    slot = {iid: i for i, (iid, *_rest) in enumerate(images)}
    sizes = {iid: (h, w) for iid, _name, h, w in images}
    prepared: list[list | None] = [None] * len(images)
    for i in range(len(anns)):
        rec = anns[i]
        anns[i] = None
        if not isinstance(rec, tuple):
            rec = compact_annotation(rec, i)
        entry = tally.paint_entry(rec, finish_annotation(rec, sizes, category_ids, missing))
        if entry is None:
            continue
        j = slot[entry[0]]
        if prepared[j] is None:
            prepared[j] = []
        prepared[j].append(entry[1])
    return prepared


def _image_tasks(
    images: list[tuple], prepared: list[list | None], missing: set[int], no_region: set[int]
) -> list[tuple | str]:
    """One task per image: (key, h, w, segmentations grouped by class) or a drop reason.

    Empties `prepared` as it goes."""
    tasks: list[tuple | str] = []
    for j, (iid, name, h, w) in enumerate(images):
        if iid in missing:
            tasks.append(DROP_MISSING_FILE)
        elif iid in no_region:
            tasks.append(DROP_NO_REGION)
        else:
            tasks.append((Path(name).stem, h, w, group_by_class(prepared[j] or ())))
        prepared[j] = None
    return tasks


def plan_split(data: dict, source: str, present_files: set[str] | None = None) -> dict:
    """Validate and group one instances file into per-image tasks (empties `data["annotations"]`).

    `data["annotations"]` may hold annotation dicts or `compact_annotation` records (what
    `load_instances(..., annotation_hook=compact_annotation)` gives). Returns {"images":
    [(id, file_name, h, w)], "tasks": [(key, h, w, groups)], "skipped": _Reasons,
    "repaired": _Reasons, "ignored": _Reasons, "stats": {...}}; a task is a drop reason (str)
    instead for an image that cannot be converted. `present_files=None` skips the zip check.
    Raises CocoFormatError for broken `images` or `categories` entries.
    """
    images = index_images(data["images"], source)
    category_ids = checked_category_ids(data["categories"], source)
    missing = _missing_images(images, present_files)
    tally = _AnnotationTally()
    n_anns = len(data["annotations"])
    prepared = _paint_entries_per_image(data["annotations"], images, category_ids, missing, tally)
    data["annotations"] = []
    return {
        "images": images,
        "tasks": _image_tasks(images, prepared, missing, tally.no_region),
        "skipped": tally.skipped,
        "repaired": tally.repaired,
        "ignored": tally.ignored,
        "stats": tally.stats(n_anns),
    }


def rejected_share(plan: Mapping[str, Any]) -> tuple[float, float]:
    """(share of annotations rejected, share of images dropped for a fault) of a plan.

    Rejected: skipped (`SKIP_REASONS`) or, for a VOC-class object, marked ignore because
    nothing of its segmentation was usable. Fault drops: `FAULT_DROPS` (not `min_pixels`,
    which drops images without VOC objects by design). 0.0 for an empty split.
    """
    st = plan["stats"]
    rejected = st["annotations_skipped"] + st["annotations_voc_marked_ignore"]
    ann_share = rejected / st["annotations_total"] if st["annotations_total"] else 0.0
    faults = sum(1 for t in plan["tasks"] if isinstance(t, str))
    img_share = faults / len(plan["images"]) if plan["images"] else 0.0
    return ann_share, img_share


def check_rejected(plan: Mapping[str, Any], source: str, max_rejected_fraction: float) -> None:
    """CocoRejectedError naming the file, the shares and every reason count when more than
    `max_rejected_fraction` of the annotations are rejected or of the images dropped for a fault
    (`rejected_share`); the same kind of limit as preprocess's `max_bad_fraction`."""
    ann_share, img_share = rejected_share(plan)
    if ann_share <= max_rejected_fraction and img_share <= max_rejected_fraction:
        return
    st = plan["stats"]
    reasons = {
        **{r: n for r, n in plan["skipped"].counts.items() if n},
        **{f"voc_marked_ignore:{r}": n for r, n in plan["ignored"].counts.items() if n},
    }
    drops: dict[str, int] = {}
    for t in plan["tasks"]:
        if isinstance(t, str):
            drops[t] = drops.get(t, 0) + 1
    raise CocoRejectedError(
        f"{source}: {st['annotations_skipped'] + st['annotations_voc_marked_ignore']} of "
        f"{st['annotations_total']} annotations rejected ({ann_share:.2%}) and "
        f"{sum(drops.values())} of {len(plan['images'])} images dropped for a fault "
        f"({img_share:.2%}); more than coco_to_voc.max_rejected_fraction "
        f"{max_rejected_fraction:g}. Annotations by reason: {reasons or 'none'}; images by "
        f"reason: {drops or 'none'}. Nothing was written."
    )


def _drain(items: list) -> Iterator:
    """Yield the items of a list, dropping the list's reference to each one as it goes."""
    for i in range(len(items)):
        item, items[i] = items[i], None
        yield item


def _run_tasks(
    tasks: list[tuple], min_pixels: int, workers: int, progress: bool, desc: str
) -> Iterator[tuple[bytes | None, int]]:
    """Yield (PNG or None, VOC pixel count) per task, in task order; empties `tasks`.

    workers=1 runs in this process. Otherwise a spawned pool: its workers start from a fresh
    interpreter, so they never hold (or copy-on-write-count) the parent's parsed JSON; the
    ordered imap keeps the output deterministic, and its pipes bound the work in flight.
    """
    fn = functools.partial(convert_task, min_pixels=min_pixels)
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, mininterval=1.0)
    try:
        if workers <= 1 or len(tasks) < 2:
            for t in _drain(tasks):
                result = fn(t)
                bar.update()  # before the yield: the consumer never resumes after the last one
                yield result
            return
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        with mp.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(fn, _drain(tasks), chunksize=chunksize):
                bar.update()
                yield result
    finally:
        bar.close()


def _triage(tasks: list, min_pixels: int) -> tuple[list[str | None], list[tuple]]:
    """(per image: a drop reason decided here, or None = sent to the workers; the work).

    An image with no VOC-class instance has nothing to rasterize: below any `min_pixels` > 0.
    Empties `tasks`."""
    verdict: list[str | None] = []
    work = []
    for task in _drain(tasks):
        if isinstance(task, str):
            verdict.append(task)
        elif min_pixels > 0 and all(k == CROWD for k in task[3]):
            verdict.append(DROP_FEW_PIXELS)
        else:
            verdict.append(None)
            work.append(task)
    return verdict, work


def _write_records(
    writer: ShardWriter,
    images: list[tuple],
    verdict: list[str | None],
    results: Iterator[tuple[bytes | None, int]],
    split: str,
) -> tuple[_Reasons, int]:
    """Write each kept image's label record, in image order; (drops by reason, VOC pixels)."""
    dropped = _Reasons(DROP_REASONS)
    voc_pixels_total = 0
    for (iid, name, h, w), reason in zip(images, verdict, strict=True):
        png = None
        if reason is None:
            png, voc_pixels = next(results)
            reason = DROP_FEW_PIXELS if png is None else None
        if reason is not None:
            dropped.add(reason, iid)
            continue
        voc_pixels_total += voc_pixels
        meta = {"image_id": iid, "file_name": name, "width": w, "height": h, "split": split}
        writer.add(Path(name).stem, {"label": png}, meta)
    return dropped, voc_pixels_total


def _write_split(
    out_dir: Path, plan: dict, work: list[tuple], verdict: list[str | None], opts: dict
) -> tuple[int, _Reasons, int]:
    """Run the work and write the shard dir `out_dir` (atomically, `ShardWriter`); (records
    kept, drops by reason, VOC pixels kept). `opts`: split, min_pixels, workers, shard_size,
    progress."""
    split = opts["split"]
    writer = ShardWriter(out_dir, opts["shard_size"])
    try:
        results = _run_tasks(
            work, opts["min_pixels"], opts["workers"], opts["progress"], f"coco_to_voc {split}"
        )
        with contextlib.closing(results):  # an error here must still stop the pool
            dropped, voc_pixels = _write_records(writer, plan["images"], verdict, results, split)
        kept = len(writer)
        writer.close(
            extra={
                "source": "coco2017",
                "split": split,
                "classes": list(VOC_CLASSES),
                "ignore_index": IGNORE_INDEX,
            }
        )
    except BaseException as e:
        writer.abort(e)
        raise
    return kept, dropped, voc_pixels


def _split_report(plan: dict, written: tuple[int, _Reasons, int], info: dict) -> dict:
    """report.json's entry of one split: counts, reasons with ids, shares, timings (`info`
    holds the inputs, params, rejected shares and perf_counter marks t0..t_end)."""
    kept, dropped, voc_pixels = written
    convert_s = info["t_end"] - info["t_plan"]
    return {
        "split": info["split"],
        "annotations": info["source"],
        "images_zip": info["images_zip"],
        "min_pixels": info["min_pixels"],
        "workers": info["workers"],
        "images_total": len(plan["images"]),
        "images_kept": kept,
        "images_dropped": dropped.report(),
        "voc_pixels_kept": voc_pixels,
        **plan["stats"],
        "annotations_skipped_by_reason": plan["skipped"].report(),
        "voc_objects_parts_dropped_by_reason": plan["repaired"].report(),
        "voc_objects_marked_ignore_by_reason": plan["ignored"].report(),
        "rejected_share": {"annotations": info["shares"][0], "images": info["shares"][1]},
        "max_rejected_fraction": info["max_rejected_fraction"],
        "id_list_cap": ID_LIST_CAP,
        "timings_s": {
            "load_json": round(info["t_load"] - info["t0"], 3),
            "validate_group": round(info["t_plan"] - info["t_load"], 3),
            "convert_write": round(convert_s, 3),
            "total": round(info["t_end"] - info["t0"], 3),
        },
        "images_per_s": round(len(plan["images"]) / convert_s, 1) if convert_s > 0 else None,
    }


def convert_split(
    annotations_zip: Path,
    images_zip: Path,
    split: str,
    out_dir: Path,
    *,
    min_pixels: int,
    workers: int,
    shard_size: int,
    progress: bool = True,
    max_rejected_fraction: float = 1.0,
) -> dict:
    """Convert `annotations/instances_<split>.json` into the shard dir `out_dir`; return the report.

    `images_zip` is only listed (its `<split>/<file_name>` members), never decoded. Raises
    CocoFormatError for an unusable file and CocoRejectedError (before anything is written)
    when more than `max_rejected_fraction` is rejected (`check_rejected`).
    """
    info: dict[str, Any] = {"t0": time.perf_counter(), "split": split}
    source = f"{annotations_zip}:annotations/instances_{split}.json"
    present = image_files_in_zip(images_zip, split)
    data = read_instances_from_zip(
        annotations_zip, f"annotations/instances_{split}.json", compact_annotation
    )
    info["t_load"] = time.perf_counter()
    plan = plan_split(data, source, present)
    del data
    check_rejected(plan, source, max_rejected_fraction)
    info["shares"] = rejected_share(plan)
    info["t_plan"] = time.perf_counter()
    verdict, work = _triage(plan.pop("tasks"), min_pixels)
    opts = {"split": split, "min_pixels": min_pixels, "workers": workers}
    written = _write_split(
        out_dir, plan, work, verdict, {**opts, "shard_size": shard_size, "progress": progress}
    )
    info["t_end"] = time.perf_counter()
    info.update(opts, source=source, images_zip=str(images_zip))
    info["max_rejected_fraction"] = max_rejected_fraction
    return _split_report(plan, written, info)
