"""Preprocess: VOC 2012 (+ COCO's VOC classes) -> resized training shards; VOC val untouched.

    data/preprocessed/train/    VOC train + COCO-VOC records, keys `voc/<id>`, `coco/<stem>`:
                                image JPEG resized so the longer side <= max_size (never
                                upscaled), label PNG mode L resized nearest-neighbour
    data/preprocessed/val/      VOC val at original resolution: the original JPEG and PNG bytes
    data/preprocessed/report.json   counts and every skipped input with the reason

Paper ideas, each in one function: `target_size` (keep aspect, never upscale), `resize_image`
(bilinear + antialias), `resize_label` (nearest only: an interpolated label map invents classes
at every boundary), `check_label_values` (0..20 and 255 only).

Decoding dominates the cost (about 80% of it), so `decode_resized` decodes JPEGs with
libjpeg-turbo (simplejpeg) straight into an interleaved RGB array, shrinking by 1/2, 1/4 or 1/8
inside the IDCT where the target allows it (`jpeg_scale_denominator`, what PIL's `draft` does),
and resizes that array as it lies (channels-last) with torch's uint8 antialiased kernel; the
same libjpeg-turbo encodes the result without a layout copy. This runs in `workers` processes;
the parent reads the archives and writes shards in a fixed order, so the output is byte-identical
whatever the number of workers. A training image that needs no resize and already is a
3-channel JPEG is stored as its original bytes (re-encoding would only add JPEG loss), after a
1/8-scale decode that still entropy-decodes, and so checks, every byte of it.

Bad inputs: an image that does not decode, a label map that is not 8-bit indices or holds values
outside 0..20/255, or an image/label size mismatch is skipped and listed in the report; the stage
fails (writing nothing) when more than `max_bad_fraction` of the inputs are bad. A list naming an
id with no image or label, or COCO-VOC records without their image, stop the stage at once.
"""

from __future__ import annotations

import collections
import difflib
import multiprocessing
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from torch import Tensor
from torchvision.io import encode_png
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.data.archives import ArchiveError, ZipReader, check_member_name, iter_tar_files
from pipeline.atomic import atomic_dir, atomic_write_json, remove_path
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.data.datasets import decode_image_rgb, decode_label
from pipeline.data.shards import ShardReader, ShardWriter

VOC_ROOT = "VOCdevkit/VOC2012"
LIST_DIR = f"{VOC_ROOT}/ImageSets/Segmentation"
VOC_SPLITS = ("train", "val")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # real ids: 2007_000032
_VALID = torch.zeros(256, dtype=torch.bool)
_VALID[:NUM_CLASSES] = True
_VALID[IGNORE_INDEX] = True
_MAX_LISTED = 10  # bad inputs / missing ids quoted in an error message


class PreprocessError(ValueError):
    """The inputs are wrong as a whole (a list naming a missing image, too many bad inputs)."""


class BadSample(ValueError):
    """One input pair is unusable; it is skipped and counted toward `max_bad_fraction`."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member, self.reason = member, reason


# --- the paper's rules, one function each --------------------------------------------------------


def target_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the longer side <= max_size and the aspect ratio kept; never upscales."""
    if height < 1 or width < 1 or max_size < 1:
        raise ValueError(f"bad size {height}x{width} or max_size {max_size}")
    longer = max(height, width)
    if longer <= max_size:
        return height, width
    s = max_size / longer
    return max(1, round(height * s)), max(1, round(width * s))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 RGB [3, H, W] -> [3, h, w], bilinear with antialiasing (no aliasing when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 class map [H, W] -> [h, w] by nearest neighbour: every output value is an input value.

    NEAREST_EXACT samples at pixel centres, like the bilinear image resize, so image and label
    stay aligned (legacy NEAREST shifts the map by up to half a pixel).
    """
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.resize(label[None], list(size), interpolation=InterpolationMode.NEAREST_EXACT)[0]


def check_label_values(label: Tensor, name: str) -> None:
    """BadSample naming `name` and the offending values unless all are in 0..20 or 255."""
    present = torch.bincount(label.reshape(-1).to(torch.int64), minlength=256) > 0
    bad = (present & ~_VALID).nonzero().flatten().tolist()
    if bad:
        raise BadSample(name, f"label values outside 0..{NUM_CLASSES - 1}/{IGNORE_INDEX}: {bad}")


def jpeg_scale_denominator(height: int, width: int, size: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 by which a JPEG can shrink while it decodes and still cover `size`.

    libjpeg-turbo scales in the IDCT: a 1/2 decode computes a 4x4 IDCT of each block's low
    frequencies, a band-limited (alias-free) downsample for a fraction of the work. Only powers
    of two: its 3/4, 5/8 ... kernels have no SIMD and decode slower than full size. Never below
    `size`, so the final antialiased resize only shrinks.
    """
    denominator = 1
    while denominator < 8:
        d = 2 * denominator
        if -(-height // d) < size[0] or -(-width // d) < size[1]:
            break
        denominator = d
    return denominator


def decode_resized(data: bytes, name: str, max_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Decode image bytes to RGB resized so the longer side is <= max_size; also its stored (H, W).

    JPEGs in YCbCr, RGB or grayscale go through `jpeg_scale_denominator` and a channels-last
    `resize_image` (the result is a [3, h, w] view of an [h, w, 3] array). Everything else - PNG,
    CMYK/YCCK JPEG, and any JPEG libjpeg-turbo's strict mode refuses - takes the
    `decode_image_rgb` path, which accepts what it always accepted and names the file in a
    BadSample when the data is really broken.
    """
    header = _jpeg_header(data)
    if header is not None:
        height, width, _ = header
        size = target_size(height, width, max_size)
        d = jpeg_scale_denominator(height, width, size)
        try:
            array = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=-(-height // d), min_width=-(-width // d)
            )
        except ValueError:
            pass  # warnings are errors in strict mode: let torchvision decide, as before
        else:
            return resize_image(torch.from_numpy(array).permute(2, 0, 1), size), (height, width)
    image = _decode_image(data, name)
    height, width = image.shape[1:]
    return resize_image(image, target_size(height, width, max_size)), (height, width)


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(height, width, colorspace) of a JPEG that libjpeg-turbo turns into RGB itself, else None."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width, colorspace) if colorspace in _RGB_ABLE else None


_RGB_ABLE = ("YCbCr", "RGB", "Gray")  # CMYK/YCCK: torchvision inverts Adobe CMYK correctly
_PASS_THROUGH = ("YCbCr", "RGB")  # 3-component JPEGs: stored as they are when not resized


def encode_image_jpeg(image: Tensor, quality: int) -> bytes:
    """uint8 RGB [3, h, w] -> JPEG (4:2:0, the libjpeg default); no copy if channels-last."""
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return simplejpeg.encode_jpeg(hwc, quality=quality, colorspace="RGB", colorsubsampling="420")


def encode_label_png(label: Tensor) -> bytes:
    """One-channel 8-bit PNG (mode L): class ids as they are, no palette."""
    return encode_png(label[None].contiguous(), compression_level=6).numpy().tobytes()


def _decode_image(data: bytes, name: str) -> Tensor:
    try:
        return decode_image_rgb(data, name)
    except ValueError as e:
        raise BadSample(name, str(e).removeprefix(f"{name}: ")) from None


def _decode_label(data: bytes, name: str) -> Tensor:
    try:
        label = decode_label(data, name)
    except ValueError as e:
        raise BadSample(name, str(e).removeprefix(f"{name}: ")) from None
    check_label_values(label, name)
    return label


def prepare_image(data: bytes, name: str, *, max_size: int, jpeg_quality: int) -> bytes:
    """One training image: decode to RGB, resize (longer side <= max_size), encode JPEG."""
    return _train_image(data, name, max_size, jpeg_quality)[0]


def _train_image(
    data: bytes, name: str, max_size: int, jpeg_quality: int
) -> tuple[bytes, tuple[int, int]]:
    """The stored bytes of a training image and the input's (H, W)."""
    header = _jpeg_header(data)
    fits = header is not None and header[2] in _PASS_THROUGH and max(header[:2]) <= max_size
    if fits and _decodes_at_one_eighth(data):
        return bytes(data), header[:2]  # type: ignore[index]
    image, stored_size = decode_resized(data, name, max_size)
    return encode_image_jpeg(image, jpeg_quality), stored_size


def _image_size(data: bytes, name: str) -> tuple[int, int]:
    """(H, W) of an image that decodes completely; BadSample naming `name` if it does not."""
    header = _jpeg_header(data)
    if header is not None and _decodes_at_one_eighth(data):
        return header[:2]
    return tuple(_decode_image(data, name).shape[1:])  # type: ignore[return-value]


def _decodes_at_one_eighth(data: bytes) -> bool:
    # a 1/8 decode entropy-decodes every byte (a truncated or corrupt stream fails as it would at
    # full size) but its IDCT is one coefficient per block: a validity check at ~1/4 of the cost
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=1, min_width=1)
    except ValueError:
        return False
    return True


def _check_pair_size(
    image_size: tuple[int, int], image_name: str, label: Tensor, label_name: str
) -> None:
    if tuple(image_size) != tuple(label.shape):
        (h, w), (lh, lw) = image_size, label.shape
        raise BadSample(label_name, f"label is {lw}x{lh} but its image {image_name} is {w}x{h}")


def prepare_train_pair(
    image_bytes: bytes,
    label_bytes: bytes,
    *,
    image_name: str,
    label_name: str,
    max_size: int,
    jpeg_quality: int,
    source: str,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A training record: resized RGB JPEG + resized mode-L PNG label; BadSample if unusable."""
    image, stored_size = _train_image(image_bytes, image_name, max_size, jpeg_quality)
    label = _decode_label(label_bytes, label_name)
    _check_pair_size(stored_size, image_name, label, label_name)
    size = target_size(*label.shape, max_size)
    blobs = {"image": image, "label": encode_label_png(resize_label(label, size))}
    return blobs, {"height": size[0], "width": size[1], "source": source}


def prepare_val_pair(
    image_bytes: bytes, label_bytes: bytes, *, image_name: str, label_name: str, source: str
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """An evaluation record: the original bytes, checked to decode and to hold valid labels."""
    image_size = _image_size(image_bytes, image_name)
    label = _decode_label(label_bytes, label_name)
    _check_pair_size(image_size, image_name, label, label_name)
    meta = {"height": int(label.shape[0]), "width": int(label.shape[1]), "source": source}
    return {"image": bytes(image_bytes), "label": bytes(label_bytes)}, meta


# --- tasks: read in the parent, decode/resize/encode in workers ----------------------------------

# (split, key, source, image_name, image_bytes, label_name, label_bytes, read_error)
Task = tuple[str, str, str, str, bytes | None, str, bytes | None, str | None]


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


class _VocStream:
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
        kind, ident = self._kind(name)
        if kind is None:
            # a file VOC would not name this way (`x.JPG`, `x.jpeg`): a hint for a missing one
            self.seen.setdefault(name.rpartition("/")[0], []).append(name)
            return False
        return kind == "list" or self.split_of is None or ident in self.split_of

    def member(self, kind: str, image_id: str) -> str:
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
                f"val.txt (training on validation images): {', '.join(both[:_MAX_LISTED])}"
            )
        self.split_of = {i: "train" for i in train} | {i: "val" for i in val}
        for image_id in [i for i in self.pending if i not in self.split_of]:
            del self.pending[image_id]  # read before the lists said they are not needed
        for image_id in sorted(self.pending):
            yield from self._ready(image_id)

    def tasks(self) -> Iterator[Task]:
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
                if len(missing) < _MAX_LISTED:
                    hints = [h for h in map(self.near_match, lacks) if h]
                    if hints:
                        line += f" (it has {' and '.join(map(repr, hints))})"
                missing.append(line)
        if missing:
            more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
            raise PreprocessError(
                f"{self.voc_tar}: {len(missing)} listed image(s) missing{more}:\n  "
                + "\n  ".join(missing[:_MAX_LISTED])
            )


def _coco_tasks(coco_voc_dir: Path, coco_dir: Path, split: str) -> Iterator[Task]:
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


def _sbd_tasks(sbd_tgz: Path, split: str, exclude: set[str], excluded: list[str]) -> Iterator[Task]:
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
    from tqdm import tqdm

    voc_tar, out_dir = Path(voc_tar), Path(out_dir)
    if not voc_tar.is_file():
        raise FileNotFoundError(f"{voc_tar}: VOC tar not found (run the download_voc stage)")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    for pattern in (
        f".{out_dir.name}.*.tmp",
        f".{out_dir.name}.old-*",
    ):  # a killed run's, ours only
        for stale in out_dir.parent.glob(pattern):
            remove_path(stale)
    if sbd not in (None, "train", "train_noval"):
        raise ValueError(f"sbd must be None, 'train' or 'train_noval', got {sbd!r}")
    if sbd is not None and (sbd_tgz is None or not Path(sbd_tgz).is_file()):
        raise FileNotFoundError(f"{sbd_tgz}: SBD benchmark.tgz not found (run download_sbd)")
    splits = list(coco_splits) if use_coco else []
    coco_counts = {}
    for split in splits:
        if coco_voc_dir is None or coco_dir is None:
            raise ValueError("use_coco needs coco_voc_dir and coco_dir")
        coco_counts[split] = len(ShardReader(Path(coco_voc_dir) / split))  # fail early
        if not (Path(coco_dir) / f"{split}.zip").is_file():
            raise FileNotFoundError(f"{Path(coco_dir) / f'{split}.zip'}: COCO zip not found")

    voc = _VocStream(voc_tar)
    sbd_excluded: list[str] = []

    def all_tasks() -> Iterator[Task]:
        yield from (t for t in voc.tasks() if voc_train or t[0] != "train")
        if sbd is not None:
            exclude = set(voc.lists["val"]) if sbd == "train_noval" else set()
            yield from _sbd_tasks(Path(sbd_tgz), "train", exclude, sbd_excluded)
        for split in splits:
            yield from _coco_tasks(Path(coco_voc_dir), Path(coco_dir), split)

    counts = {"train": collections.Counter(), "val": collections.Counter()}
    skipped: list[dict[str, str]] = []
    seen = 0
    bar = tqdm(desc="preprocess", unit="img", disable=not progress, dynamic_ncols=True)
    with atomic_dir(out_dir) as tmp:
        with (
            ShardWriter(tmp / "train", shard_size) as train_w,
            ShardWriter(tmp / "val", shard_size) as val_w,
        ):
            writers = {"train": train_w, "val": val_w}
            for result in _ordered_map(_run_task, all_tasks(), workers, max_size, jpeg_quality):
                seen += 1
                if bar.total is None and voc.split_of is not None and sbd is None:
                    bar.total = len(voc.split_of) + sum(coco_counts.values())
                bar.update(1)
                if result[0] == "ok":
                    _, split, key, blobs, meta = result
                    writers[split].add(key, blobs, meta)
                    counts[split][meta["source"]] += 1
                else:
                    _, split, key, member, reason = result
                    skipped.append({"key": key, "split": split, "member": member, "reason": reason})
                    bar.set_postfix(bad=len(skipped))
            bar.close()
            _check_bad(skipped, seen, max_bad_fraction)
            for split in ("train", "val"):
                if not writers[split]:
                    raise PreprocessError(f"{voc_tar}: no usable {split} images")
        report = {
            "params": {
                "max_size": max_size,
                "jpeg_quality": jpeg_quality,
                "shard_size": shard_size,
                "voc_train": voc_train,
                "sbd": sbd,
                "use_coco": use_coco,
                "coco_splits": splits,
                "max_bad_fraction": max_bad_fraction,
            },
            "inputs": seen,
            "train": {"records": len(train_w), "by_source": dict(sorted(counts["train"].items()))},
            "val": {"records": len(val_w), "by_source": dict(sorted(counts["val"].items()))},
            "coco_label_records": coco_counts,
            # train_noval: SBD train images left out because VOC 2012 val scores them
            "sbd_excluded_voc2012_val": len(sbd_excluded),
            "bad": len(skipped),
            "bad_fraction": len(skipped) / seen,
            "skipped": skipped,
        }
        atomic_write_json(tmp / "report.json", report)
    return report


def _check_bad(skipped: list[dict[str, str]], seen: int, max_bad_fraction: float) -> None:
    if seen and len(skipped) / seen > max_bad_fraction:
        listed = "\n  ".join(f"{s['member']}: {s['reason']}" for s in skipped[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        )
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
