"""Preprocess: VOC 2012 (+ SBD, + COCO's VOC classes) -> resized training shards; VOC val untouched.

    data/preprocessed/train/    VOC train + SBD + COCO-VOC records, keys `voc/<id>`, `sbd/<id>`,
                                `coco/<stem>`: image JPEG resized so the longer side <= max_size
                                (never upscaled), label PNG mode L resized nearest-neighbour
    data/preprocessed/val/      VOC val at original resolution: the original JPEG and PNG bytes
    data/preprocessed/report.json   counts and every skipped input with the reason

The parts: `pipeline.data.preprocess_inputs` reads the archives into tasks (one pass over the
VOC tar, SBD's lists, the COCO-VOC records with their images); `pipeline.data.preprocess_image`
decodes, resizes and encodes one image/label pair (the paper's rules, one function each); this
module runs the tasks in `workers` processes and writes the shards. The parent reads the
archives and writes shards in a fixed order, so the output is byte-identical whatever the
number of workers.

Bad inputs: an image that does not decode, a label map that is not 8-bit indices or holds values
outside 0..20/255, or an image/label size mismatch is skipped and listed in the report; the stage
fails (writing nothing) when more than `max_bad_fraction` of the inputs are bad. A list naming an
id with no image or label, or COCO-VOC records without their image, stop the stage at once.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_dir, atomic_write_json, remove_path
from pipeline.data.preprocess_image import BadSample, prepare_train_pair, prepare_val_pair
from pipeline.data.preprocess_inputs import (
    MAX_LISTED,
    PreprocessError,
    Task,
    VocStream,
    coco_tasks,
    sbd_tasks,
)
from pipeline.data.shards import ShardReader, ShardWriter

# --- tasks: read in the parent, decode/resize/encode in workers ----------------------------------


def _run_task(task: Task, max_size: int, jpeg_quality: int) -> tuple:
    split, key, source, image_name, image_bytes, label_name, label_bytes, read_error = task
    try:
        if read_error is not None:
            raise BadSample(image_name, read_error)
        if split == "train":
            blobs, meta = prepare_train_pair(
                image_bytes,
                label_bytes,
                image_name=image_name,
                label_name=label_name,
                max_size=max_size,
                jpeg_quality=jpeg_quality,
                source=source,
            )
        else:
            blobs, meta = prepare_val_pair(
                image_bytes,
                label_bytes,
                image_name=image_name,
                label_name=label_name,
                source=source,
            )
    except BadSample as e:
        return ("bad", split, key, e.member, e.reason)
    return ("ok", split, key, blobs, meta)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; nested threads only fight for it


def _ordered_map(fn: Callable, tasks: Iterable, workers: int, *args: Any) -> Iterator:
    """fn(task, *args) for each task, results in task order, at most 4*workers tasks in flight."""
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # images are small: intra-op threads cost more than they give
        try:
            for t in tasks:
                yield fn(t, *args)
        finally:
            torch.set_num_threads(threads)
        return
    # fork: workers inherit the imported torch instead of paying ~1 s and 0.8 GB each to spawn
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    window: collections.deque = collections.deque()
    try:
        for t in tasks:
            window.append(pool.submit(fn, t, *args))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_inputs(voc_tar: Path, max_bad_fraction: float) -> None:
    """FileNotFoundError for a missing VOC tar, ValueError for a bad `max_bad_fraction`."""
    if not voc_tar.is_file():
        raise FileNotFoundError(f"{voc_tar}: VOC tar not found (run the download_voc stage)")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


def _remove_stale(out_dir: Path) -> None:
    """Remove the temporaries a killed run of this output left beside it (ours only)."""
    for pattern in (f".{out_dir.name}.*.tmp", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            remove_path(stale)


def _check_sbd(sbd: str | None, sbd_tgz: Path | None) -> None:
    """ValueError for an unknown `sbd` choice, FileNotFoundError for a missing SBD archive."""
    if sbd not in (None, "train", "train_noval"):
        raise ValueError(f"sbd must be None, 'train' or 'train_noval', got {sbd!r}")
    if sbd is not None and (sbd_tgz is None or not Path(sbd_tgz).is_file()):
        raise FileNotFoundError(f"{sbd_tgz}: SBD benchmark.tgz not found (run download_sbd)")


def _coco_label_counts(
    splits: list[str], coco_voc_dir: Path | None, coco_dir: Path | None
) -> dict[str, int]:
    """Label records per COCO split, read before any work so that a missing input fails early."""
    counts = {}
    for split in splits:
        if coco_voc_dir is None or coco_dir is None:
            raise ValueError("use_coco needs coco_voc_dir and coco_dir")
        counts[split] = len(ShardReader(Path(coco_voc_dir) / split))
        if not (Path(coco_dir) / f"{split}.zip").is_file():
            raise FileNotFoundError(f"{Path(coco_dir) / f'{split}.zip'}: COCO zip not found")
    return counts


def _all_tasks(voc: VocStream, opts: dict[str, Any], sbd_excluded: list[str]) -> Iterator[Task]:
    """VOC (train only if `voc_train`; val always), then SBD train, then the COCO splits."""
    yield from (t for t in voc.tasks() if opts["voc_train"] or t[0] != "train")
    if opts["sbd"] is not None:
        exclude = set(voc.lists["val"]) if opts["sbd"] == "train_noval" else set()
        yield from sbd_tasks(Path(opts["sbd_tgz"]), "train", exclude, sbd_excluded)
    for split in opts["coco_splits"]:
        yield from coco_tasks(Path(opts["coco_voc_dir"]), Path(opts["coco_dir"]), split)


class _Tally:
    """Records written per split and source, and the skipped inputs with their reasons."""

    def __init__(self) -> None:
        self.counts = {"train": collections.Counter(), "val": collections.Counter()}
        self.skipped: list[dict[str, str]] = []
        self.seen = 0

    def write(self, result: tuple, writers: dict[str, ShardWriter]) -> None:
        """Write an "ok" result to its split's shards, or list a "bad" one as skipped."""
        self.seen += 1
        if result[0] == "ok":
            _, split, key, blobs, meta = result
            writers[split].add(key, blobs, meta)
            self.counts[split][meta["source"]] += 1
        else:
            _, split, key, member, reason = result
            self.skipped.append({"key": key, "split": split, "member": member, "reason": reason})


def _write_shards(tmp: Path, opts: dict[str, Any]) -> tuple[_Tally, tuple[int, int], int]:
    """Run every task and write `tmp/{train,val}`; (the tally, (train records, val records),
    SBD images excluded as VOC 2012 val images).

    Raises PreprocessError (nothing is kept) above `max_bad_fraction` or for an empty split.
    """
    from tqdm import tqdm

    voc = VocStream(opts["voc_tar"])
    sbd_excluded: list[str] = []
    tally = _Tally()

    bar = tqdm(desc="preprocess", unit="img", disable=not opts["progress"], dynamic_ncols=True)
    with (
        ShardWriter(tmp / "train", opts["shard_size"]) as train_w,
        ShardWriter(tmp / "val", opts["shard_size"]) as val_w,
    ):
        writers = {"train": train_w, "val": val_w}
        results = _ordered_map(
            _run_task,
            _all_tasks(voc, opts, sbd_excluded),
            opts["workers"],
            opts["max_size"],
            opts["jpeg_quality"],
        )
        for result in results:
            if bar.total is None and voc.split_of is not None and opts["sbd"] is None:
                bar.total = len(voc.split_of) + sum(opts["coco_counts"].values())
            bar.update(1)
            tally.write(result, writers)
            if result[0] != "ok":
                bar.set_postfix(bad=len(tally.skipped))
        bar.close()
        _check_bad(tally.skipped, tally.seen, opts["max_bad_fraction"])
        for split in ("train", "val"):
            if not writers[split]:
                raise PreprocessError(f"{opts['voc_tar']}: no usable {split} images")
    return tally, (len(train_w), len(val_w)), len(sbd_excluded)


def _report(
    opts: dict[str, Any], tally: _Tally, records: tuple[int, int], n_sbd_excluded: int
) -> dict[str, Any]:
    """report.json: the params, records per split and source, and every skipped input."""
    keys = ("max_size", "jpeg_quality", "shard_size", "voc_train", "sbd", "use_coco")
    skipped, seen = tally.skipped, tally.seen
    return {
        "params": {
            **{k: opts[k] for k in keys},
            "coco_splits": opts["coco_splits"],
            "max_bad_fraction": opts["max_bad_fraction"],
        },
        "inputs": seen,
        "train": {"records": records[0], "by_source": dict(sorted(tally.counts["train"].items()))},
        "val": {"records": records[1], "by_source": dict(sorted(tally.counts["val"].items()))},
        "coco_label_records": opts["coco_counts"],
        # train_noval: SBD train images left out because VOC 2012 val scores them
        "sbd_excluded_voc2012_val": n_sbd_excluded,
        "bad": len(skipped),
        "bad_fraction": len(skipped) / seen,
        "skipped": skipped,
    }


def preprocess(
    voc_tar: Path,
    coco_voc_dir: Path | None,
    coco_dir: Path | None,
    out_dir: Path,
    *,
    max_size: int,
    jpeg_quality: int,
    shard_size: int,
    use_coco: bool,
    workers: int,
    max_bad_fraction: float,
    coco_splits: Sequence[str] = ("train2017", "val2017"),
    voc_train: bool = True,
    sbd: str | None = None,
    sbd_tgz: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out_dir/{train,val}` shards and `out_dir/report.json` atomically; return the report.

    Records: VOC train (tar order; if `voc_train`), then SBD (`sbd`: "train" is SBD's train
    list, "train_noval" the same minus every VOC 2012 val id, in list order, from `sbd_tgz`),
    then COCO-VOC `coco_splits` in order (if `use_coco`) into train; VOC val into val. Keys are
    "<source>/<id>": an SBD image that is also a VOC train image is trained on twice, once per
    annotation. Output bytes depend only on the inputs and on these parameters, not on
    `workers`. The report counts the SBD images excluded as VOC 2012 val images.

    Raises:
        FileNotFoundError: an input archive is missing.
        PreprocessError: a malformed input (named), too many bad images, or an empty split.
        pipeline.data.sbd.SbdError: a truncated SBD archive or an unreadable .mat (named).
    """
    voc_tar, out_dir = Path(voc_tar), Path(out_dir)
    _check_inputs(voc_tar, max_bad_fraction)
    _remove_stale(out_dir)
    _check_sbd(sbd, sbd_tgz)
    splits = list(coco_splits) if use_coco else []
    opts = {
        "voc_tar": voc_tar,
        "max_size": max_size,
        "jpeg_quality": jpeg_quality,
        "shard_size": shard_size,
        "voc_train": voc_train,
        "sbd": sbd,
        "sbd_tgz": sbd_tgz,
        "use_coco": use_coco,
        "coco_splits": splits,
        "coco_voc_dir": coco_voc_dir,
        "coco_dir": coco_dir,
        "coco_counts": _coco_label_counts(splits, coco_voc_dir, coco_dir),
        "max_bad_fraction": max_bad_fraction,
        "workers": workers,
        "progress": progress,
    }
    with atomic_dir(out_dir) as tmp:
        tally, records, n_sbd_excluded = _write_shards(tmp, opts)
        report = _report(opts, tally, records, n_sbd_excluded)
        atomic_write_json(tmp / "report.json", report)
    return report


def _check_bad(skipped: list[dict[str, str]], seen: int, max_bad_fraction: float) -> None:
    if seen and len(skipped) / seen > max_bad_fraction:
        listed = "\n  ".join(f"{s['member']}: {s['reason']}" for s in skipped[:MAX_LISTED])
        more = f"\n  ... and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
        raise PreprocessError(
            f"{len(skipped)} of {seen} inputs are unusable ({len(skipped) / seen:.2%} > "
            f"preprocess.max_bad_fraction {max_bad_fraction:g}); nothing was written:\n  "
            f"{listed}{more}"
        )


def preprocess_voc(
    voc_tar: Path,
    out_dir: Path,
    *,
    max_size: int,
    jpeg_quality: int = 90,
    shard_size: int = 1000,
    workers: int = 1,
    max_bad_fraction: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """`preprocess` with VOC only (no COCO inputs)."""
    return preprocess(
        voc_tar,
        None,
        None,
        out_dir,
        max_size=max_size,
        jpeg_quality=jpeg_quality,
        shard_size=shard_size,
        use_coco=False,
        workers=workers,
        max_bad_fraction=max_bad_fraction,
        progress=progress,
    )
