"""Images and pixels per class counted from the label maps of preprocessed shard dirs.

A labelled pixel is one whose label is not 255. The sources are the records'
`meta["source"]`: `voc`, `coco` (COCO-VOC), `sbd` when present. Counts are integer sums over
fixed chunks, so they do not depend on the number of workers. Used by the data card
(`pipeline.reports.data_card`).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.data.shards import ShardReader

SPLITS = ("train", "val")


SOURCE_ORDER = ("voc", "coco", "sbd")  # any other source follows, sorted by name


_CHUNK = 256  # label maps per worker task


class DataCardError(ValueError):
    """The shards hold something no data card can count (a label value outside 0..20/255)."""


def label_histogram(png: bytes, name: str) -> np.ndarray:
    """Pixel count of each value 0..255 in a label PNG (mode L or VOC palette), int64 [256].

    Raises DataCardError naming `name` when a value is neither a class (0..20) nor 255.
    """
    import torch

    from pipeline.data.datasets import decode_label

    label = decode_label(png, name)
    hist = torch.bincount(label.reshape(-1).to(torch.int64), minlength=256).numpy()
    bad = [int(v) for v in np.flatnonzero(hist) if v >= NUM_CLASSES and v != IGNORE_INDEX]
    if bad:
        raise DataCardError(f"{name}: label values outside 0..{NUM_CLASSES - 1}/255: {bad}")
    return hist.astype(np.int64)


def _count_range(args: tuple[str, int, int]) -> dict[str, tuple[int, np.ndarray]]:
    """{source: (images, histogram)} of records start..stop of one shard dir."""
    directory, start, stop = args
    reader = ShardReader(directory)
    out: dict[str, tuple[int, np.ndarray]] = {}
    try:
        for i in range(start, stop):
            source = str(reader.meta(i).get("source", "unknown"))
            name = f"{directory}[{i}] {reader.records[i]['key']!r} label"
            hist = label_histogram(reader.blob(i, "label"), name)
            n, total = out.get(source, (0, np.zeros(256, np.int64)))
            out[source] = (n + 1, total + hist)
    finally:
        reader.close()
    return out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def count_split(directory: str | Path, workers: int = 1) -> dict[str, dict[str, Any]]:
    """Images and pixels per label value of each source of one shard dir.

    Returns {source: {"images": n, "class_pixels": [21 ints], "ignore_pixels": n}}; integer
    sums, so the result does not depend on `workers`.
    """
    directory = str(directory)
    n = len(ShardReader(directory))
    tasks = [(directory, s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    if workers <= 1 or len(tasks) < 2:
        parts: Iterable = map(_count_range, tasks)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
        parts = pool.map(_count_range, tasks)
    totals: dict[str, tuple[int, np.ndarray]] = {}
    try:
        for part in parts:
            for source, (k, hist) in part.items():
                m, total = totals.get(source, (0, np.zeros(256, np.int64)))
                totals[source] = (m + k, total + hist)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {
        source: {
            "images": k,
            "class_pixels": [int(v) for v in hist[:NUM_CLASSES]],
            "ignore_pixels": int(hist[IGNORE_INDEX]),
        }
        for source, (k, hist) in totals.items()
    }


def source_order(sources: Iterable[str]) -> list[str]:
    """`voc`, `coco`, `sbd` first (those present), then any other source by name."""
    present = set(sources)
    known = [s for s in SOURCE_ORDER if s in present]
    return known + sorted(present - set(SOURCE_ORDER))


def count_dataset(preprocessed: str | Path, workers: int = 1) -> dict[str, dict[str, dict]]:
    """{source: {split: counts}} of `preprocessed/{train,val}` (`count_split`), sources in
    `source_order` and splits train, val; a source absent from a split has no entry there."""
    by_split = {split: count_split(Path(preprocessed) / split, workers) for split in SPLITS}
    sources = source_order(s for counts in by_split.values() for s in counts)
    return {
        source: {split: by_split[split][source] for split in SPLITS if source in by_split[split]}
        for source in sources
    }


def count_groups(counts: Mapping[str, Mapping[str, Mapping]]) -> list[tuple[str, str, Mapping]]:
    """(source, split, counts) of every group of `count_dataset`'s result, in its order."""
    return [(source, split, c) for source, splits in counts.items() for split, c in splits.items()]


def labelled_pixels(c: Mapping[str, Any]) -> int:
    """Pixels whose label is not 255 (background included)."""
    return sum(c["class_pixels"])
