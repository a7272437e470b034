"""The inputs of preprocess read into tasks: the VOC tar, SBD's benchmark.tgz, COCO-VOC records.

Each task is one image/label pair read in the parent process (`Task`); the workers decode,
resize and encode it (`pipeline.data.preprocess_image`). A list naming an id with no image or
label, a hostile id, or COCO-VOC records without their image raise `PreprocessError`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.data.archives import ArchiveError, ZipReader, check_member_name, iter_tar_files
from pipeline.data.preprocess_image import encode_label_png
from pipeline.data.shards import ShardReader

VOC_ROOT = "VOCdevkit/VOC2012"


LIST_DIR = f"{VOC_ROOT}/ImageSets/Segmentation"


VOC_SPLITS = ("train", "val")


_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # real ids: 2007_000032


MAX_LISTED = 10  # bad inputs / missing ids quoted in an error message


class PreprocessError(ValueError):
    """The inputs are wrong as a whole (a list naming a missing image, too many bad inputs)."""


# (split, key, source, image_name, image_bytes, label_name, label_bytes, read_error)
Task = tuple[str, str, str, str, bytes | None, str, bytes | None, str | None]


def _check_id(image_id: str, list_name: str, line: int) -> str:
    if not _ID.fullmatch(image_id) or ".." in image_id:
        raise PreprocessError(f"{list_name} line {line}: {image_id!r} is not a VOC image id")
    return image_id


def parse_voc_list(text: bytes, list_name: str) -> list[str]:
    """Ids of an ImageSets list, one per line; clear errors for junk and duplicates."""
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PreprocessError(f"{list_name}: not UTF-8 text ({e})") from None
    ids, seen = [], set()
    for n, line in enumerate(lines, 1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in seen:
            raise PreprocessError(f"{list_name} line {n}: {image_id!r} is listed twice")
        seen.add(_check_id(image_id, list_name, n))
        ids.append(image_id)
    return ids


class VocStream:
    """One pass over the VOC tar: reads the split lists, then only the listed pairs.

    A listed JPEG is held until its label PNG arrives (JPEGImages/ precedes SegmentationClass/ in
    the tar: about 300 MB for the ~2.9k labelled images of the 2 GB archive); the other 14k
    JPEGs are skipped unread. Members that come before both lists are held until the lists say
    whether they are needed.
    """

    def __init__(self, voc_tar: Path) -> None:
        self.voc_tar = Path(voc_tar)
        self.lists: dict[str, list[str]] = {}
        self.split_of: dict[str, str] | None = None  # known once both lists are read
        self.pending: dict[str, dict[str, bytes]] = {}
        self.emitted: set[str] = set()
        self.seen: dict[str, list[str]] = {}  # folder -> unused member names (near-match hints)

    def _kind(self, name: str) -> tuple[str | None, str]:
        if name.startswith(LIST_DIR + "/"):
            split = name[len(LIST_DIR) + 1 :].removesuffix(".txt")
            return ("list", split) if split in VOC_SPLITS and name.endswith(".txt") else (None, "")
        for kind, folder, ext in (
            ("jpg", "JPEGImages", ".jpg"),
            ("png", "SegmentationClass", ".png"),
        ):
            prefix = f"{VOC_ROOT}/{folder}/"
            if name.startswith(prefix) and name.endswith(ext) and "/" not in name[len(prefix) :]:
                return kind, name[len(prefix) : -len(ext)]
        return None, ""

    def wanted(self, name: str) -> bool:
        """Whether the tar member `name` is read: a list, or the image/label of a listed id (all
        of them until both lists are known); other names are remembered for near-match hints."""
        kind, ident = self._kind(name)
        if kind is None:
            # a file VOC would not name this way (`x.JPG`, `x.jpeg`): a hint for a missing one
            self.seen.setdefault(name.rpartition("/")[0], []).append(name)
            return False
        return kind == "list" or self.split_of is None or ident in self.split_of

    def member(self, kind: str, image_id: str) -> str:
        """Tar member name of the image ("jpg") or label ("png") of `image_id`."""
        folder, ext = {"jpg": ("JPEGImages", ".jpg"), "png": ("SegmentationClass", ".png")}[kind]
        return f"{VOC_ROOT}/{folder}/{image_id}{ext}"

    def _ready(self, image_id: str) -> Iterator[Task]:
        got = self.pending.get(image_id, {})
        if self.split_of is None or "jpg" not in got or "png" not in got:
            return
        del self.pending[image_id]
        self.emitted.add(image_id)
        split = self.split_of[image_id]
        tar = self.voc_tar.name
        yield (
            split,
            f"voc/{image_id}",
            "voc",
            f"{tar}:{self.member('jpg', image_id)}",
            got["jpg"],
            f"{tar}:{self.member('png', image_id)}",
            got["png"],
            None,
        )

    def _lists_complete(self) -> Iterator[Task]:
        train, val = self.lists["train"], self.lists["val"]
        both = sorted(set(train) & set(val))
        if both:
            raise PreprocessError(
                f"{self.voc_tar}: {len(both)} id(s) are in both {LIST_DIR}/train.txt and "
                f"val.txt (training on validation images): {', '.join(both[:MAX_LISTED])}"
            )
        self.split_of = {i: "train" for i in train} | {i: "val" for i in val}
        for image_id in [i for i in self.pending if i not in self.split_of]:
            del self.pending[image_id]  # read before the lists said they are not needed
        for image_id in sorted(self.pending):
            yield from self._ready(image_id)

    def tasks(self) -> Iterator[Task]:
        """Every listed pair as a `Task`, in tar order; PreprocessError for a missing list or pair."""
        for name, data in iter_tar_files(self.voc_tar, self.wanted):
            kind, ident = self._kind(name)
            if kind == "list":
                self.lists[ident] = parse_voc_list(data, f"{self.voc_tar}:{name}")
                if len(self.lists) == len(VOC_SPLITS):
                    yield from self._lists_complete()
            else:
                self.pending.setdefault(ident, {})[kind] = data
                yield from self._ready(ident)
        self._check_complete()

    def near_match(self, member: str) -> str | None:
        """The unused member of the same folder closest to `member` (same name but for case
        first, else difflib ratio >= 0.8), or None: `2007_000132.JPG` for a missing
        `2007_000132.jpg`. Members that are some id's image or label are never suggested."""
        folder = member.rpartition("/")[0]
        names = self.seen.get(folder, [])
        folded = [n for n in names if n.casefold() == member.casefold()]
        if folded:
            return folded[0]
        close = difflib.get_close_matches(member, names, n=1, cutoff=0.8)
        return close[0] if close else None

    def _check_complete(self) -> None:
        for split in VOC_SPLITS:
            if split not in self.lists:
                raise PreprocessError(
                    f"{self.voc_tar}: no member {LIST_DIR}/{split}.txt "
                    "(is this the VOC 2012 trainval tar, VOCtrainval_11-May-2012.tar?)"
                )
        missing = []
        for split in VOC_SPLITS:
            for image_id in self.lists[split]:
                if image_id in self.emitted:
                    continue
                got = self.pending.get(image_id, {})
                lacks = [self.member(k, image_id) for k in ("jpg", "png") if k not in got]
                line = f"{LIST_DIR}/{split}.txt names {image_id!r} but the tar has no {' or '.join(lacks)}"
                if len(missing) < MAX_LISTED:
                    hints = [h for h in map(self.near_match, lacks) if h]
                    if hints:
                        line += f" (it has {' and '.join(map(repr, hints))})"
                missing.append(line)
        if missing:
            more = f" (and {len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
            raise PreprocessError(
                f"{self.voc_tar}: {len(missing)} listed image(s) missing{more}:\n  "
                + "\n  ".join(missing[:MAX_LISTED])
            )


def coco_tasks(coco_voc_dir: Path, coco_dir: Path, split: str) -> Iterator[Task]:
    """COCO-VOC label records of one split with their images from `<coco_dir>/<split>.zip`."""
    shard_dir, zip_path = Path(coco_voc_dir) / split, Path(coco_dir) / f"{split}.zip"
    labels = ShardReader(shard_dir)
    with ZipReader(zip_path) as images:
        for i, rec in enumerate(labels.records):
            stem, file_name = rec["key"], rec["meta"].get("file_name")
            if not isinstance(file_name, str) or "/" in file_name or "\\" in file_name:
                raise PreprocessError(
                    f"{shard_dir}: record {stem!r} has no plain meta file_name ({file_name!r})"
                )
            member = f"{split}/{file_name}"
            if check_member_name(member, zip_path) != member or member not in images:
                raise PreprocessError(
                    f"{zip_path}: no member {member!r}, named by record {stem!r} of {shard_dir} "
                    "(coco_to_voc output and the COCO zip disagree: re-run coco_to_voc)"
                )
            image_bytes, error = None, None
            try:
                image_bytes = images.read(member)
            except ArchiveError as e:  # CRC mismatch: this member is damaged
                error = str(e)
            yield (
                "train",
                f"coco/{stem}",
                "coco",
                f"{zip_path.name}:{member}",
                image_bytes,
                f"coco_voc/{split}[{i}] {stem!r} label",
                labels.blob(i, "label"),
                error,
            )


def sbd_tasks(sbd_tgz: Path, split: str, exclude: set[str], excluded: list[str]) -> Iterator[Task]:
    """SBD records of `split` ("train" or "val" of SBD's lists) as training tasks, but those
    in `exclude` (appended to `excluded` instead); the .mat labels are read here, once, into
    PNG label maps."""
    from pipeline.data.sbd import read_sbd

    for rec in read_sbd(sbd_tgz, split):
        if rec.image_id in exclude:
            excluded.append(rec.image_id)
            continue
        yield (
            "train",
            f"sbd/{rec.image_id}",
            "sbd",
            f"{sbd_tgz.name}:{rec.image_name}",
            rec.image,
            f"{sbd_tgz.name}:{rec.label_name}",
            encode_label_png(torch.from_numpy(rec.label)),
            None,
        )
