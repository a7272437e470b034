"""Evaluation splits: all of VOC 2012 val, or the FCN papers' seg11valid subset of it.

seg11valid is the 736 images of the PASCAL VOC 2011 segmentation val set that are not in SBD's
training set (Hariharan et al. 2011): the set of the FCN paper's Table 2 and of the released
models' figures (FCN-32s 63.6, FCN-16s 65.0, FCN-8s 65.5 mean IU). `seg11valid.txt` beside this
module is `data/pascal/seg11valid.txt` of shelhamer/fcn.berkeleyvision.org at commit
1305c7378a9f0ab44b2c936f4d60e4687e3d8743, md5 7984b6ce736bd3666d8b7ee70b5401da; every id is a
VOC 2012 JPEGImages/SegmentationClass member, so the VOC 2012 val shards already hold them.

Shard keys are "<source>/<image id>" (`pipeline.data.preprocess`); VOC and SBD share image ids
(SBD re-annotates VOC 2011 images), COCO ids are numeric and never collide with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

SPLITS = ("voc2012_val", "seg11valid")
SEG11VALID_PATH = Path(__file__).with_name("seg11valid.txt")
SEG11VALID_MD5 = "7984b6ce736bd3666d8b7ee70b5401da"
# sources whose image ids are VOC ids (an image of one is the same photo in the other)
VOC_ID_SOURCES = ("voc", "sbd")


def seg11valid_ids(path: Path = SEG11VALID_PATH) -> list[str]:
    """The 736 seg11valid image ids ("2007_000033", ...), in file order.

    Raises:
        ValueError: the file's bytes are not the published list (md5 differs).
    """
    data = path.read_bytes()
    digest = hashlib.md5(data).hexdigest()
    if digest != SEG11VALID_MD5:
        raise ValueError(f"{path}: md5 {digest}, expected {SEG11VALID_MD5} (the published list)")
    return data.decode().split()


def image_id(key: str) -> tuple[str, str]:
    """Shard key "voc/2007_000033" -> ("voc", "2007_000033")."""
    source, _, ident = key.partition("/")
    return source, ident


class KeySubset(Dataset):
    """The records of `dataset` at `indices`, keeping `key(i)`."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def key(self, i: int) -> str:
        return self.dataset.key(self.indices[i])


def select_split(dataset: Any, split: str, allow_partial: bool = False) -> Any:
    """`dataset` (with `key(i)`) restricted to `split`: "voc2012_val" keeps every record,
    "seg11valid" the VOC records whose id is in the list; with `allow_partial`, those of the
    736 that `dataset` holds (a test or dry run: not a figure to set beside the paper's).

    Raises:
        ValueError: unknown split; a seg11valid id missing from `dataset` (it does not hold
            VOC 2012 val: the sample's generated val set, for instance), or with
            `allow_partial` none of them present.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "voc2012_val":
        return dataset
    wanted = {f"voc/{i}" for i in seg11valid_ids()}  # VOC records only: not SBD's copies
    indices = [i for i in range(len(dataset)) if dataset.key(i) in wanted]
    if allow_partial and indices:
        return KeySubset(dataset, indices)
    if len(indices) != len(wanted):
        raise ValueError(
            f"seg11valid has {len(wanted)} images, the val shards hold {len(indices)} of them: "
            "they are not VOC 2012 val (use evaluate.split: voc2012_val for this data)"
        )
    return KeySubset(dataset, indices)


def overlap(train_keys: Iterable[str], eval_keys: Iterable[str]) -> list[str]:
    """Image ids both trained on and scored: VOC/SBD ids in both key lists, sorted."""

    def ids(keys: Iterable[str]) -> set[str]:
        return {i for s, i in map(image_id, keys) if s in VOC_ID_SOURCES}

    return sorted(ids(train_keys) & ids(eval_keys))


def check_no_overlap(train_keys: Iterable[str], eval_keys: Iterable[str], split: str) -> None:
    """Refuse to score images the models were trained on.

    Raises:
        ValueError: naming the count and the first ids of the overlap (SBD train holds most of
            VOC 2012 val, which is why the paper scores seg11valid).
    """
    both = overlap(train_keys, eval_keys)
    if both:
        raise ValueError(
            f"{len(both)} image(s) of the {split} split are in the training shards "
            f"(e.g. {', '.join(both[:5])}): scores on them would not measure generalisation"
        )
