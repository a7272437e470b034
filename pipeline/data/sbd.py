"""SBD (Semantic Boundaries Dataset, Hariharan et al., ICCV 2011): the FCN paper's training set.

SBD re-annotates 11,355 PASCAL VOC 2011 images with full class segmentations; FCN trains on its
`train` split (8,498 images). The release is one gzip tar, `benchmark.tgz` (1.4 GB):

    benchmark_RELEASE/dataset/img/<id>.jpg     the VOC JPEG, bytes as in VOC
    benchmark_RELEASE/dataset/cls/<id>.mat     MATLAB v5 file, struct GTcls: Segmentation (uint8
                                               [H, W], class ids 0..20, no 255 void border),
                                               Boundaries (20x1 cell), CategoriesPresent
    benchmark_RELEASE/dataset/inst/<id>.mat    instance masks (not used here)
    benchmark_RELEASE/dataset/{train,val}.txt  one VOC image id (`2008_000002`) per line

`read_sbd` streams the archive (never seeks, never unpacks it) in two sequential passes through
`pipeline.data.archives.iter_tar_files`, which checks every member name (no `..`, no absolute paths,
no escaping links) and reports a truncated or corrupt archive:

1. the split list and the `cls/*.mat` of the wanted ids, parsed and validated at once; each label
   is held zlib-compressed (a few kB, against ~190 kB as an array: 1.6 GB for all of `train`).
   `.mat` members met before the list are held as stored until the list says which are wanted
   (the member order of the real archive is not known). The names of the `img/` members are
   noted too, so a listed id without its image or label fails here, before anything is yielded;
2. the JPEGs of the wanted ids, yielded one by one as they come: memory stays at one image.

Records therefore come in the archive's order of the `img/` members (sorted by id for archives
written by `write_sbd_tgz`), the same on every run over the same file; yielding in the list's
order would need the whole image folder in memory when the archive's order differs.

`write_sbd_tgz` writes an archive of the same layout with byte-identical output for identical
input; `make_sbd_sample` builds the offline sample's SBD from the sample VOC tar
(`pipeline.data.sample.make_voc_sample`).
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.io
import scipy.sparse

from pipeline.atomic import atomic_path
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.data.archives import ArchiveError, iter_tar_files

SBD_ROOT = "benchmark_RELEASE/dataset"
SBD_SPLITS = ("train", "val")
SBD_MTIME = 1293840000  # member times of written archives: 2011-01-01 UTC (fixed, arbitrary)
MAX_CLASS = NUM_CLASSES - 1  # 20: SBD labels are 0 (background) .. 20, no 255
_ID = re.compile(r"[0-9]{4}_[0-9]{6}")  # VOC 2011 image ids: 2008_000002
_MAX_LISTED = 10  # missing members / bad ids quoted in one error message
# the 116-byte text header of a MAT v5 file; scipy writes the current time there
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, written by pipeline.data.sbd".ljust(116)
VOC_ROOT = "VOCdevkit/VOC2012"  # in the VOC 2012 trainval tar, as in pipeline.data.sample


class SbdError(ValueError):
    """A wrong SBD archive or member; the message names the archive and the member."""


class SbdRecord(NamedTuple):
    """One SBD image with its class segmentation.

    `image_name` / `label_name` are the member names inside the archive
    (`benchmark_RELEASE/dataset/img/<id>.jpg`, `.../cls/<id>.mat`); `image` is the JPEG as
    stored; `label` is uint8 [H, W] with class ids 0..20.
    """

    image_id: str
    image_name: str
    image: bytes
    label_name: str
    label: np.ndarray


def _member(kind: str, image_id: str) -> str:
    folder, ext = {"img": ("img", ".jpg"), "cls": ("cls", ".mat")}[kind]
    return f"{SBD_ROOT}/{folder}/{image_id}{ext}"


def _list_member(split: str) -> str:
    return f"{SBD_ROOT}/{split}.txt"


def _id_of(name: str, kind: str) -> str | None:
    """The image id when `name` is `<SBD_ROOT>/<kind>/<id>.<ext>` for a valid id, else None."""
    prefix, ext = f"{SBD_ROOT}/{kind}/", {"img": ".jpg", "cls": ".mat"}[kind]
    if not (name.startswith(prefix) and name.endswith(ext)):
        return None
    image_id = name[len(prefix) : -len(ext)]
    return image_id if _ID.fullmatch(image_id) else None


# --- reading --------------------------------------------------------------------------------


def read_cls_mat(data: bytes, name: str) -> np.ndarray:
    """Return `GTcls.Segmentation` of an SBD `cls/<id>.mat` file: uint8 [H, W], values 0..20.

    `data` is the file's bytes (MATLAB v5, compressed or not); `name` is put in every error.
    Raises SbdError when the bytes are not a readable MATLAB v5 file, hold no struct `GTcls`
    with a field `Segmentation`, when that is not a non-empty 2-D integer array, or when it
    holds values outside 0..20.
    """
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["GTcls"])
    except Exception as e:  # scipy raises IndexError, OSError, MatReadError, ... on junk
        raise SbdError(
            f"{name}: not a readable MATLAB file ({type(e).__name__}: {e}; "
            f"starts with {bytes(data[:16])!r})"
        ) from None
    gt = mat.get("GTcls")
    if not isinstance(gt, np.ndarray) or gt.dtype.names is None:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise SbdError(f"{name}: no struct GTcls in the file (variables: {found})")
    if "Segmentation" not in gt.dtype.names or gt.size != 1:
        raise SbdError(
            f"{name}: GTcls must be one struct with a field Segmentation, got shape "
            f"{gt.shape} with fields {list(gt.dtype.names)}"
        )
    seg = gt["Segmentation"].flat[0]
    if not isinstance(seg, np.ndarray) or seg.ndim != 2 or seg.size == 0:
        shape = getattr(seg, "shape", type(seg).__name__)
        raise SbdError(f"{name}: GTcls.Segmentation is not a non-empty 2-D array ({shape})")
    if not np.issubdtype(seg.dtype, np.integer):
        raise SbdError(f"{name}: GTcls.Segmentation has dtype {seg.dtype}, not class ids")
    bad = np.unique(seg[(seg < 0) | (seg > MAX_CLASS)])
    if bad.size:
        raise SbdError(
            f"{name}: GTcls.Segmentation holds values outside 0..{MAX_CLASS}: "
            f"{bad[:_MAX_LISTED].tolist()}"
        )
    return np.ascontiguousarray(seg, dtype=np.uint8)


def _parse_list(data: bytes, name: str) -> list[str]:
    """Ids of a split list, one per line (blank lines skipped); SbdError for junk/duplicates."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SbdError(f"{name}: not UTF-8 text ({e})") from None
    ids: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        image_id = line.strip()
        if not image_id:
            continue
        if not _ID.fullmatch(image_id):
            raise SbdError(
                f"{name} line {n}: {image_id[:40]!r} is not an image id like 2008_000002"
            )
        if image_id in seen:
            raise SbdError(f"{name} line {n}: {image_id!r} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids


class _Packed(NamedTuple):
    """A label held between the passes: zlib-compressed bytes of a uint8 [H, W] array."""

    shape: tuple[int, int]
    data: bytes

    @classmethod
    def pack(cls, label: np.ndarray) -> _Packed:
        return cls((int(label.shape[0]), int(label.shape[1])), zlib.compress(label.tobytes(), 1))

    def unpack(self) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self.data), dtype=np.uint8).reshape(self.shape).copy()


def _stream(tgz: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """`iter_tar_files` with its ArchiveError (hostile member, truncated/corrupt) as SbdError."""
    try:
        yield from iter_tar_files(tgz, wanted)
    except ArchiveError as e:
        # its truncation message ends with a hint naming the VOC/COCO download stages
        msg, hint, _ = str(e).partition("; delete it and re-run the download stage")
        raise SbdError(
            msg + ("; delete it and download benchmark.tgz again" if hint else "")
        ) from None


def _first_pass(
    tgz: Path, split: str, exclude: frozenset[str]
) -> tuple[list[str], dict[str, _Packed]]:
    """Read the split list and the wanted labels; check that every wanted id has both members.

    Returns the wanted ids in list order and their packed labels.
    """
    list_name = _list_member(split)
    ids: list[str] | None = None
    wanted: set[str] = set()
    early: dict[str, bytes] = {}  # cls members met before the list, as stored
    labels: dict[str, _Packed] = {}
    images: set[str] = set()

    def keep(name: str) -> bool:
        image_id = _id_of(name, "img")
        if image_id is not None:
            images.add(image_id)  # noted, not read: pass 2 reads the wanted ones
            return False
        if name == list_name:
            return True
        image_id = _id_of(name, "cls")
        return image_id is not None and (ids is None or image_id in wanted)

    def add_label(image_id: str, data: bytes) -> None:
        name = f"{tgz}: {_member('cls', image_id)}"
        if image_id in labels:
            raise SbdError(f"{name}: the member appears twice in the archive")
        labels[image_id] = _Packed.pack(read_cls_mat(data, name))

    for name, data in _stream(tgz, keep):
        if name == list_name:
            if ids is not None:
                raise SbdError(f"{tgz}: {list_name}: the member appears twice in the archive")
            ids = [i for i in _parse_list(data, f"{tgz}: {list_name}") if i not in exclude]
            wanted = set(ids)
            for image_id in sorted(early.keys() & wanted):
                add_label(image_id, early[image_id])
            early.clear()
        else:
            image_id = _id_of(name, "cls")
            assert image_id is not None  # `keep` let only the list and cls members through
            if ids is None:
                if image_id in early:
                    raise SbdError(f"{tgz}: {name}: the member appears twice in the archive")
                early[image_id] = data
            else:
                add_label(image_id, data)
    if ids is None:
        raise SbdError(
            f"{tgz}: no member {list_name} (is this SBD's benchmark.tgz, with {SBD_ROOT}/?)"
        )
    _check_members(tgz, list_name, ids, images, labels)
    return ids, labels


def _check_members(
    tgz: Path, list_name: str, ids: list[str], images: set[str], labels: Collection[str]
) -> None:
    """SbdError naming the first missing `img/` or `cls/` members of the listed `ids`."""
    missing = [
        _member(kind, i)
        for i in ids
        for kind, have in (("img", images), ("cls", labels))
        if i not in have
    ]
    if missing:
        more = f" (first {_MAX_LISTED})" if len(missing) > _MAX_LISTED else ""
        raise SbdError(
            f"{tgz}: {list_name} names ids whose members are missing: {len(missing)} missing "
            f"member(s){more}: {', '.join(missing[:_MAX_LISTED])}"
        )


def read_sbd(tgz: Path, split: str, exclude: Collection[str] = ()) -> Iterator[SbdRecord]:
    """Yield the images of SBD split `split` ("train" or "val") from `benchmark.tgz`.

    Ids in `exclude` are skipped (e.g. VOC 2012 val ids, to train on SBD train without them).
    Records come in the archive's order of the `img/` members (deterministic for a given
    file), after a first pass that reads the list and validates every wanted label (module
    docstring). Raises SbdError naming the archive and the member when: `split` is not in
    SBD_SPLITS; the list member is missing or holds a line that is not an id (`2008_000002`)
    or an id twice; listed ids lack their `img/` or `cls/` member (all missing members are
    counted, the first 10 named); a `.mat` member is not a valid SBD label (`read_cls_mat`);
    the archive is truncated or corrupt; a member name is unsafe (absolute, `..`, a link out
    of the archive). FileNotFoundError when `tgz` does not exist.
    """
    tgz = Path(tgz)
    if split not in SBD_SPLITS:
        raise SbdError(
            f"{tgz}: {_list_member(split)}: unknown SBD split {split!r}, expected one of "
            f"{SBD_SPLITS}"
        )
    if not tgz.is_file():
        raise FileNotFoundError(f"{tgz}: SBD archive not found")
    return _records(tgz, split, frozenset(exclude))


def _records(tgz: Path, split: str, exclude: frozenset[str]) -> Iterator[SbdRecord]:
    ids, labels = _first_pass(tgz, split, exclude)

    def keep(name: str) -> bool:
        image_id = _id_of(name, "img")
        return image_id is not None and image_id in labels

    for name, data in _stream(tgz, keep):
        image_id = _id_of(name, "img")
        assert image_id is not None
        label = labels.pop(image_id, None)
        if label is None:
            raise SbdError(f"{tgz}: {name}: the member appears twice in the archive")
        yield SbdRecord(image_id, name, data, _member("cls", image_id), label.unpack())
    if labels:  # pass 1 saw these images: the file changed between the passes
        lost = [_member("img", i) for i in ids if i in labels]
        raise SbdError(
            f"{tgz}: {lost[0]}: the member was in the archive's first pass but not its second "
            f"({len(lost)} image(s)); did the file change while it was read?"
        )


# --- writing --------------------------------------------------------------------------------


def _cls_mat(label: np.ndarray) -> bytes:
    """A `cls/<id>.mat` as SBD stores it: struct GTcls with Boundaries (20x1 cell of empty
    sparse [H, W] matrices here), Segmentation (uint8 [H, W]) and CategoriesPresent (uint8
    column of the classes present, background excluded); MAT v5, compressed, fixed header."""
    boundaries = np.empty((MAX_CLASS, 1), dtype=object)
    for k in range(MAX_CLASS):
        boundaries[k, 0] = scipy.sparse.csc_matrix(label.shape, dtype=bool)
    present = np.array([c for c in np.unique(label).tolist() if c != 0], dtype=np.uint8)
    gt = {
        "Boundaries": boundaries,
        "Segmentation": label,
        "CategoriesPresent": present.reshape(-1, 1),
    }
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": gt}, do_compression=True)
    data = buf.getvalue()
    return _MAT_HEADER + data[len(_MAT_HEADER) :]


def _check_label(label: np.ndarray, what: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or label.size == 0 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"{what}: need a non-empty 2-D integer array, got {label.shape} {label.dtype}"
        )
    if label.min() < 0 or label.max() > MAX_CLASS:
        raise ValueError(f"{what}: values must be 0..{MAX_CLASS}, got {label.min()}..{label.max()}")
    return np.ascontiguousarray(label, dtype=np.uint8)


def _write_tgz(path: Path, files: dict[str, bytes]) -> int:
    """Gzip'd GNU tar with parent directory entries, sorted members, fixed times and owners,
    gzip header time 0 and no file name: identical bytes for identical `files`. Atomic."""
    from pipeline.data.sample_pack import add_tar_members

    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        return add_tar_members(tar, files, SBD_MTIME)


def write_sbd_tgz(
    path: Path,
    images: dict[str, bytes],
    labels: dict[str, np.ndarray],
    splits: dict[str, list[str]],
) -> None:
    """Write an SBD-layout `benchmark.tgz` at `path` (atomically; byte-identical for identical
    input; `inst/` is not written).

    `images`: id -> JPEG bytes (`img/<id>.jpg`); `labels`: id -> integer [H, W] array with
    values 0..20 (`cls/<id>.mat`, stored uint8); `splits`: "train"/"val" -> ids, written one per
    line in the given order (`<split>.txt`). Raises ValueError naming `path` for an id that is
    not like `2008_000002`, `images` and `labels` with different ids, a split not in
    SBD_SPLITS, a listed id without image and label or listed twice, and a bad label array.
    """
    path = Path(path)
    bad = sorted(i for i in images.keys() | labels.keys() if not _ID.fullmatch(i))
    if bad:
        raise ValueError(f"{path}: ids must be like 2008_000002, got {bad[:_MAX_LISTED]}")
    if images.keys() != labels.keys():
        odd = sorted(images.keys() ^ labels.keys())
        raise ValueError(f"{path}: ids with an image but no label or the reverse: {odd[:10]}")
    files: dict[str, bytes] = {}
    for split, ids in splits.items():
        if split not in SBD_SPLITS:
            raise ValueError(f"{path}: unknown SBD split {split!r}, expected one of {SBD_SPLITS}")
        unknown = [i for i in ids if i not in images]
        if unknown or len(set(ids)) != len(ids):
            raise ValueError(
                f"{path}: split {split!r} names ids without image/label or twice: "
                f"{(unknown or sorted(ids))[:_MAX_LISTED]}"
            )
        files[_list_member(split)] = "".join(f"{i}\n" for i in ids).encode()
    for image_id in sorted(images):
        files[_member("img", image_id)] = bytes(images[image_id])
        label = _check_label(labels[image_id], f"{path}: label of {image_id}")
        files[_member("cls", image_id)] = _cls_mat(label)
    _write_tgz(path, files)


# --- the offline sample ---------------------------------------------------------------------


def make_sbd_sample(voc_tar: Path, out: Path) -> dict[str, Any]:
    """Write the offline sample's `benchmark.tgz` at `out` from the sample VOC 2012 tar.

    As the real SBD re-annotates VOC 2011 images, every image of the VOC tar's `train` and
    `val` lists becomes an SBD image with the same id and JPEG bytes; its label is the VOC label
    with the 255 void border set to 0 (SBD has none). SBD `train` = all VOC train ids plus the
    first half (rounded up) of the sorted VOC val ids, SBD `val` = the other VOC val ids: SBD
    train overlaps VOC val, as in reality. Lists are written sorted. Reads the whole tar into
    memory (meant for the samples of `pipeline.data.sample`, not the 2 GB release). Identical bytes
    for the same `voc_tar`. Raises ValueError naming the tar and member for a missing list,
    image or label, or a label with values outside 0..20/255. Returns counts: `images`,
    `train`, `val`, `voc_val_in_train` (VOC val ids in SBD train) and `archive`.
    """
    from pipeline.data.datasets import decode_label  # torch: only needed here

    voc_tar, out = Path(voc_tar), Path(out)
    lists_dir = f"{VOC_ROOT}/ImageSets/Segmentation"

    def keep(name: str) -> bool:
        folder = name.rpartition("/")[0]
        return folder in (f"{VOC_ROOT}/JPEGImages", f"{VOC_ROOT}/SegmentationClass") or name in {
            f"{lists_dir}/{s}.txt" for s in SBD_SPLITS
        }

    members = dict(iter_tar_files(voc_tar, keep))
    voc: dict[str, list[str]] = {}
    for split in SBD_SPLITS:
        name = f"{lists_dir}/{split}.txt"
        if name not in members:
            raise ValueError(f"{voc_tar}: no member {name}")
        voc[split] = _parse_list(members[name], f"{voc_tar}: {name}")
    images: dict[str, bytes] = {}
    labels: dict[str, np.ndarray] = {}
    for image_id in sorted(voc["train"] + voc["val"]):
        jpg = f"{VOC_ROOT}/JPEGImages/{image_id}.jpg"
        png = f"{VOC_ROOT}/SegmentationClass/{image_id}.png"
        for name in (jpg, png):
            if name not in members:
                raise ValueError(f"{voc_tar}: {name}: listed id without this member")
        label = decode_label(members[png], f"{voc_tar}: {png}").numpy().copy()
        bad = np.unique(label[(label > MAX_CLASS) & (label != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(f"{voc_tar}: {png}: values outside 0..20/255: {bad.tolist()}")
        label[label == IGNORE_INDEX] = 0
        images[image_id], labels[image_id] = members[jpg], label
    val_sorted = sorted(voc["val"])
    half = (len(val_sorted) + 1) // 2
    splits = {"train": sorted(voc["train"] + val_sorted[:half]), "val": val_sorted[half:]}
    write_sbd_tgz(out, images, labels, splits)
    return {
        "archive": str(out),
        "images": len(images),
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "voc_val_in_train": half,
    }
