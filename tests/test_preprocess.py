"""preprocess: real VOC/COCO sample files packed like the real archives, run through the stage code."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import COCO_TO_VOC, IGNORE_INDEX
from pipeline.data.datasets import SegmentationShards, decode_label
from pipeline.data.preprocess import preprocess, preprocess_voc
from pipeline.data.preprocess_image import (
    BadSample,
    check_label_values,
    decode_resized,
    jpeg_scale_denominator,
    prepare_image,
    resize_image,
    resize_label,
    target_size,
)
from pipeline.data.preprocess_inputs import PreprocessError
from pipeline.data.shards import ShardReader, ShardWriter
from tests.repo_utils import tiny_params, write_params

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
    pytest.mark.usefixtures("one_thread"),
]

ROOT = "VOCdevkit/VOC2012"
MAX_SIZE = 160
COCO_SPLIT = "val2017"
N_COCO = 10


# --- building inputs from the real samples ---------------------------------------------------------


def voc_files(voc: Path, train: list[str], val: list[str]) -> dict[str, bytes]:
    files = {
        f"{ROOT}/ImageSets/Segmentation/{s}.txt": "".join(f"{i}\n" for i in ids).encode()
        for s, ids in (("train", train), ("val", val), ("trainval", train + val))
    }
    for i in train + val:
        files[f"{ROOT}/JPEGImages/{i}.jpg"] = (voc / "JPEGImages" / f"{i}.jpg").read_bytes()
        files[f"{ROOT}/SegmentationClass/{i}.png"] = (
            voc / "SegmentationClass" / f"{i}.png"
        ).read_bytes()
    return files


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    """Sorted members, like the real archive (ImageSets/ before JPEGImages/ before Segmentation*)."""
    with tarfile.open(path, "w") as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tf.addfile(info, io.BytesIO(files[name]))
    return path


def voc_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def jpeg_as(data: bytes, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def coco_label(coco, image_id: int, h: int, w: int) -> np.ndarray:
    """VOC classes of the real COCO annotations (later annotations on top), 0 elsewhere."""
    label = np.zeros((h, w), dtype=np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        voc = COCO_TO_VOC.get(ann["category_id"])
        if voc is not None:
            label[coco.annToMask(ann) > 0] = voc
    return label


def png_l(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, "L").save(buf, "PNG")
    return buf.getvalue()


def write_coco_inputs(
    coco_sample: Path, root: Path, corrupt: str | None = None
) -> tuple[Path, Path]:
    """coco_voc/<split>/ label shards + coco/<split>.zip of the real images (one gray, one CMYK)."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_sample / "annotations" / "instances_val2017.json"))
    images = sorted(coco.imgs.values(), key=lambda im: im["file_name"])[:N_COCO]
    coco_voc, coco_dir = root / "coco_voc", root / "coco"
    coco_dir.mkdir(parents=True, exist_ok=True)
    with (
        ShardWriter(coco_voc / COCO_SPLIT, 4) as w,
        zipfile.ZipFile(coco_dir / f"{COCO_SPLIT}.zip", "w") as z,
    ):
        for k, im in enumerate(images):
            data = (coco_sample / "images" / COCO_SPLIT / im["file_name"]).read_bytes()
            data = {0: jpeg_as(data, "L"), 1: jpeg_as(data, "CMYK")}.get(k, data)
            stem = Path(im["file_name"]).stem
            if stem == corrupt:
                data = data[: len(data) // 3]
            z.writestr(f"{COCO_SPLIT}/{im['file_name']}", data)
            label = coco_label(coco, im["id"], im["height"], im["width"])
            meta = {
                "image_id": im["id"],
                "file_name": im["file_name"],
                "width": im["width"],
                "height": im["height"],
                "split": COCO_SPLIT,
            }
            w.add(stem, {"label": png_l(label)}, meta)
    return coco_voc, coco_dir


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(voc_tar: Path, out: Path, *, coco: tuple[Path, Path] | None = None, **kw) -> dict:
    args = dict(
        max_size=MAX_SIZE,
        jpeg_quality=90,
        shard_size=50,
        workers=1,
        max_bad_fraction=0.0,
        progress=False,
    )
    args.update(kw)
    if coco is None:
        return preprocess(voc_tar, None, None, out, use_coco=False, **args)
    return preprocess(
        voc_tar, coco[0], coco[1], out, use_coco=True, coco_splits=[COCO_SPLIT], **args
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, voc_sample, coco_sample):
    """The whole real sample plus 10 COCO images, preprocessed twice (1 and 2 workers)."""
    root = tmp_path_factory.mktemp("pre")
    tar = write_tar(
        root / "voc.tar",
        voc_files(voc_sample, voc_ids(voc_sample, "train"), voc_ids(voc_sample, "val")),
    )
    coco = write_coco_inputs(coco_sample, root)
    reports = [run(tar, root / f"out{w}", coco=coco, workers=w) for w in (1, 2)]
    return root, reports


@pytest.fixture()
def small(tmp_path, voc_sample):
    """6 train + 2 val real pairs as files; tests break one and pack the tar."""
    train, val = voc_ids(voc_sample, "train")[:6], voc_ids(voc_sample, "val")[:2]
    return tmp_path, train, val, voc_files(voc_sample, train, val)


# --- the rules ----------------------------------------------------------------------------------


def test_target_size_keeps_aspect_and_never_upscales():
    assert target_size(375, 500, 160) == (120, 160)
    assert target_size(500, 333, 160) == (160, 107)
    assert target_size(480, 640, 512) == (384, 512)
    assert target_size(375, 500, 500) == (375, 500)
    assert target_size(100, 80, 512) == (100, 80)  # never upscaled
    assert target_size(4000, 3, 160) == (160, 1)


def test_resize_label_real_voc_keeps_class_ids(voc_sample):
    pngs = sorted((voc_sample / "SegmentationClass").glob("*.png"))[::6]
    assert len(pngs) >= 15
    for png in pngs:
        label = decode_label(png.read_bytes(), png.name)
        before = set(label.unique().tolist())
        h, w = label.shape
        for size in (
            target_size(h, w, 160),
            target_size(h, w, 97),
            (h * 2 + 1, w + 3),
            (h // 3, w // 2),
        ):
            after = set(resize_label(label, size).unique().tolist())
            assert after <= before, f"{png.name} -> {size}: invented {after - before}"
            assert IGNORE_INDEX in after, f"{png.name} -> {size}: the 255 boundary vanished"


def test_resize_label_is_aligned_with_resized_image():
    # a step edge at 1/3 of the width: the label edge lands where the image edge is half-way
    label = torch.zeros(30, 300, dtype=torch.uint8)
    label[:, 100:] = 7
    image = (label.float() * 30).to(torch.uint8).expand(3, -1, -1).contiguous()
    small_label, small_image = resize_label(label, (10, 100)), resize_image(image, (10, 100))
    edge_label = int((small_label[0] == 7).nonzero()[0])
    edge_image = int((small_image[0, 0] >= 105).nonzero()[0])
    assert edge_label == edge_image == 33


def test_resize_image_is_antialiased():
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 255).to(torch.uint8)
    out = resize_image(checker.expand(3, -1, -1).contiguous(), (16, 16))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert (out.int() - 127).abs().max() <= 2  # aliasing would give a pattern of 0s and 255s


def test_check_label_values_names_member_and_values():
    label = torch.tensor([[0, 20, 255], [21, 37, 1]], dtype=torch.uint8)
    with pytest.raises(BadSample, match=r"x\.png: label values outside 0\.\.20/255: \[21, 37\]"):
        check_label_values(label, "x.png")
    check_label_values(torch.tensor([[0, 20, 255]], dtype=torch.uint8), "ok.png")


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_gray_and_cmyk_jpegs_come_out_rgb(voc_sample, mode):
    original = (voc_sample / "JPEGImages" / "2007_000039.jpg").read_bytes()
    data = jpeg_as(original, mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    for max_size, shape in ((160, (120, 160)), (1000, reference.shape[:2])):  # resized, and not
        out = Image.open(
            io.BytesIO(prepare_image(data, "x.jpg", max_size=max_size, jpeg_quality=95))
        )
        assert out.format == "JPEG" and out.mode == "RGB" and (out.height, out.width) == shape
    if mode == "L":
        assert np.ptp(np.asarray(out, dtype=np.int16), axis=2).max() <= 8  # still gray
    assert np.abs(np.asarray(out, dtype=np.int16) - reference).mean() < 3
    # an RGB JPEG that needs no resize is kept byte for byte (no second JPEG loss)
    assert prepare_image(original, "x.jpg", max_size=1000, jpeg_quality=95) == original


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (375, 500, (240, 320), 1),  # 1/2 would be 250 wide: below the target, no upscaling
        (480, 640, (240, 320), 2),  # exactly 2x
        (375, 500, (120, 160), 2),
        (375, 500, (30, 40), 8),  # never beyond libjpeg-turbo's 1/8
        (333, 500, (107, 160), 2),  # ceil(333 / 2) = 167 >= 107
        (481, 641, (160, 160), 2),  # the smaller side decides: ceil(481 / 4) = 121 < 160
        (100, 100, (100, 100), 1),
    ],
)
def test_jpeg_scale_denominator(height, width, size, expected):
    assert jpeg_scale_denominator(height, width, size) == expected


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_decode_resized_matches_full_decode_and_resize(voc_sample, coco_sample):
    """The fast path gives the pixels of decode-then-resize: to rounding where it decodes at full
    size, and close (a sharper, band-limited shrink inside the IDCT) where it decodes at 1/2."""
    from pipeline.data.datasets import decode_image_rgb

    files = sorted((voc_sample / "JPEGImages").glob("*.jpg"))[:6]
    files += sorted((coco_sample / "images" / COCO_SPLIT).glob("*.jpg"))[:4]
    seen = set()
    for f in files:
        data = f.read_bytes()
        full = decode_image_rgb(data, f.name)
        for max_size in (320, 160, 100):
            size = target_size(*full.shape[1:], max_size)
            ours, stored = decode_resized(data, f.name, max_size)
            assert stored == tuple(full.shape[1:]) and tuple(ours.shape) == (3, *size)
            reference = resize_image(full, size)
            denominator = jpeg_scale_denominator(*full.shape[1:], size)
            seen.add(denominator)
            if denominator == 1:
                assert (ours.int() - reference.int()).abs().max() <= 2, f.name
            else:
                assert _psnr(ours, reference) > 30, (f.name, max_size, denominator)
    assert seen >= {1, 2}  # both paths were exercised


def test_decode_resized_falls_back_for_png_and_names_broken_files(voc_sample):
    data = (voc_sample / "JPEGImages" / "2007_000039.jpg").read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    image, stored = decode_resized(png.getvalue(), "x.png", 160)
    assert tuple(image.shape) == (3, *target_size(*stored, 160))
    with pytest.raises(BadSample, match=r"^cut\.jpg: .*truncated"):
        decode_resized(data[: len(data) // 2], "cut.jpg", 160)
    with pytest.raises(BadSample, match=r"^cut\.jpg: .*truncated"):  # also when it needs no resize
        prepare_image(data[: len(data) // 2], "cut.jpg", max_size=1000, jpeg_quality=90)


# --- the stage end to end -------------------------------------------------------------------------


def test_output_is_byte_identical_across_runs_and_worker_counts(full_run):
    root, (r1, r2) = full_run
    h1, h2 = tree_hashes(root / "out1"), tree_hashes(root / "out2")
    assert set(h1) == {
        "report.json",
        "train/index.json",
        "train/shard-00000.bin",
        "train/shard-00001.bin",
        "val/index.json",
        "val/shard-00000.bin",
    }
    assert h1 == h2
    assert r1 == r2 == json.loads((root / "out1" / "report.json").read_text())


def test_report_counts(full_run, voc_sample):
    _, (report, _) = full_run
    n_train, n_val = len(voc_ids(voc_sample, "train")), len(voc_ids(voc_sample, "val"))
    assert report["train"] == {
        "records": n_train + N_COCO,
        "by_source": {"coco": N_COCO, "voc": n_train},
    }
    assert report["val"] == {"records": n_val, "by_source": {"voc": n_val}}
    assert report["inputs"] == n_train + n_val + N_COCO and report["bad"] == 0
    assert report["skipped"] == []


def test_train_records_resized_rgb_with_nearest_labels(full_run, voc_sample):
    root, _ = full_run
    reader = ShardReader(root / "out1" / "train")
    keys = reader.keys()
    assert keys[: len(voc_ids(voc_sample, "train"))] == [
        f"voc/{i}" for i in voc_ids(voc_sample, "train")
    ]
    assert sum(k.startswith("coco/") for k in keys) == N_COCO
    for i, key in enumerate(keys):
        rec = reader[i]
        image = Image.open(io.BytesIO(rec.blobs["image"]))
        label = Image.open(io.BytesIO(rec.blobs["label"]))
        assert image.format == "JPEG" and image.mode == "RGB", key  # gray/CMYK COCO included
        assert label.format == "PNG" and label.mode == "L", key
        assert image.size == label.size == (rec.meta["width"], rec.meta["height"]), key
        assert max(image.size) <= MAX_SIZE and rec.meta["source"] == key.split("/")[0]
        if key.startswith("voc/"):  # the label is the nearest resize of the original, exactly
            orig = decode_label(
                (voc_sample / "SegmentationClass" / f"{key[4:]}.png").read_bytes(), key
            )
            assert max(image.size) == MAX_SIZE  # every sample image is larger than 160
            expect = resize_label(orig, (image.height, image.width)).numpy()
            np.testing.assert_array_equal(np.asarray(label), expect)


def test_val_keeps_original_bytes_and_decodes_to_indices(full_run, voc_sample):
    root, _ = full_run
    ds = SegmentationShards(root / "out1" / "val")
    ids = voc_ids(voc_sample, "val")
    assert [ds.key(i) for i in range(len(ds))] == [f"voc/{i}" for i in ids]
    for i, image_id in enumerate(ids):
        jpg = (voc_sample / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        png = (voc_sample / "SegmentationClass" / f"{image_id}.png").read_bytes()
        assert ds.reader.blob(i, "image") == jpg and ds.reader.blob(i, "label") == png
        image, mask = ds[i]
        np.testing.assert_array_equal(mask.numpy(), np.asarray(Image.open(io.BytesIO(png))))
        assert image.shape[1:] == mask.shape == (ds.meta(i)["height"], ds.meta(i)["width"])


# --- bad inputs -----------------------------------------------------------------------------------


def test_corrupt_jpeg_in_tar_is_skipped_and_counted(small):
    tmp, train, _, files = small
    files[f"{ROOT}/JPEGImages/{train[2]}.jpg"] = files[f"{ROOT}/JPEGImages/{train[2]}.jpg"][:5000]
    (tmp / ".out.x1y2.tmp" / "train").mkdir(parents=True)  # left by a killed run
    report = run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=0.2)
    assert not (tmp / ".out.x1y2.tmp").exists()
    (bad,) = report["skipped"]
    assert bad["key"] == f"voc/{train[2]}" and bad["split"] == "train"
    assert bad["member"].endswith(f"{ROOT}/JPEGImages/{train[2]}.jpg")
    assert "truncated" in bad["reason"]
    assert report["train"]["records"] == 5 and report["bad"] == 1
    assert json.loads((tmp / "out" / "report.json").read_text()) == report
    kept = ShardReader(tmp / "out" / "train").keys()
    assert f"voc/{train[2]}" not in kept and len(kept) == 5


def test_too_many_bad_inputs_fail_and_leave_the_old_output(small):
    tmp, train, _, files = small
    files[f"{ROOT}/JPEGImages/{train[0]}.jpg"] = b"\xff\xd8\xff\xe0" + b"garbage" * 50
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(
        PreprocessError, match=rf"1 of 8 inputs.*max_bad_fraction 0.1(.|\n)*{train[0]}\.jpg"
    ):
        run(write_tar(tmp / "voc.tar", files), out, max_bad_fraction=0.1)
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_label_values_outside_range_are_skipped_with_member_and_values(small):
    tmp, _, val, files = small
    name = f"{ROOT}/SegmentationClass/{val[1]}.png"
    label = np.asarray(Image.open(io.BytesIO(files[name]))).copy()
    label[:5, :5] = 37
    files[name] = png_l(label)
    report = run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=0.5)
    (bad,) = report["skipped"]
    assert bad["key"] == f"voc/{val[1]}" and bad["split"] == "val" and bad["member"].endswith(name)
    assert bad["reason"] == "label values outside 0..20/255: [37]"
    assert report["val"]["records"] == 1


def test_label_size_mismatch_is_skipped(small):
    tmp, train, _, files = small
    name = f"{ROOT}/SegmentationClass/{train[1]}.png"
    files[name] = png_l(np.zeros((10, 12), np.uint8))
    report = run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=0.5)
    assert [s["key"] for s in report["skipped"]] == [f"voc/{train[1]}"]
    assert "label is 12x10 but its image" in report["skipped"][0]["reason"]


def test_rgb_label_png_is_refused(small):
    tmp, train, _, files = small
    name = f"{ROOT}/SegmentationClass/{train[1]}.png"
    buf = io.BytesIO()
    Image.open(io.BytesIO(files[name])).convert("RGB").save(buf, "PNG")
    files[name] = buf.getvalue()
    report = run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=0.5)
    assert "palette PNG (any bit depth) or 8-bit grayscale" in report["skipped"][0]["reason"]


def test_list_naming_a_missing_image_is_an_error(small):
    tmp, train, _, files = small
    del files[f"{ROOT}/JPEGImages/{train[3]}.jpg"]
    with pytest.raises(
        PreprocessError,
        match=rf"train\.txt names '{train[3]}' but the tar has no .*JPEGImages/{train[3]}\.jpg",
    ):
        run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=1.0)
    assert not (tmp / "out").exists()


def test_list_naming_a_missing_label_is_an_error(small):
    tmp, _, val, files = small
    del files[f"{ROOT}/SegmentationClass/{val[0]}.png"]
    with pytest.raises(
        PreprocessError, match=rf"val\.txt names '{val[0]}'.*SegmentationClass/{val[0]}\.png"
    ):
        run(write_tar(tmp / "voc.tar", files), tmp / "out")


def test_hostile_id_in_list_is_an_error(small):
    tmp, train, _, files = small
    files[f"{ROOT}/ImageSets/Segmentation/train.txt"] = "\n".join(
        [*train, "../../etc/passwd"]
    ).encode()
    with pytest.raises(
        PreprocessError, match=r"train\.txt line 7: '\.\./\.\./etc/passwd' is not a VOC image id"
    ):
        run(write_tar(tmp / "voc.tar", files), tmp / "out")


def test_id_in_train_and_val_is_an_error(small):
    tmp, train, val, files = small
    files[f"{ROOT}/ImageSets/Segmentation/val.txt"] = "\n".join([*val, train[0]]).encode()
    with pytest.raises(PreprocessError, match=rf"in both .*train\.txt and val\.txt.*{train[0]}"):
        run(write_tar(tmp / "voc.tar", files), tmp / "out")


def test_tar_without_lists_is_an_error(small):
    tmp, _, _, files = small
    del files[f"{ROOT}/ImageSets/Segmentation/val.txt"]
    with pytest.raises(
        PreprocessError, match=r"no member VOCdevkit/VOC2012/ImageSets/Segmentation/val\.txt"
    ):
        run(write_tar(tmp / "voc.tar", files), tmp / "out")


def test_members_before_the_lists_are_still_found(small):
    tmp, train, val, files = small
    lists = {k: v for k, v in files.items() if "ImageSets" in k}
    with tarfile.open(tmp / "voc.tar", "w") as tf:  # images first, lists last
        for name in [*sorted(set(files) - set(lists)), *sorted(lists)]:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tf.addfile(info, io.BytesIO(files[name]))
    report = preprocess_voc(tmp / "voc.tar", tmp / "out", max_size=MAX_SIZE, progress=False)
    assert report["train"]["records"] == len(train) and report["val"]["records"] == len(val)


def test_corrupt_jpeg_in_coco_zip_is_skipped_and_counted(small, coco_sample):
    tmp, _, _, files = small
    from pycocotools.coco import COCO

    names = sorted(
        im["file_name"]
        for im in COCO(str(coco_sample / "annotations" / "instances_val2017.json")).imgs.values()
    )
    victim = Path(names[4]).stem
    coco = write_coco_inputs(coco_sample, tmp, corrupt=victim)
    report = run(write_tar(tmp / "voc.tar", files), tmp / "out", coco=coco, max_bad_fraction=0.1)
    (bad,) = report["skipped"]
    assert (
        bad["key"] == f"coco/{victim}"
        and bad["member"] == f"{COCO_SPLIT}.zip:{COCO_SPLIT}/{victim}.jpg"
    )
    assert report["train"]["by_source"] == {"coco": N_COCO - 1, "voc": 6}


def test_coco_record_without_its_image_is_an_error(small, coco_sample):
    tmp, _, _, files = small
    coco_voc, coco_dir = write_coco_inputs(coco_sample, tmp)
    with ShardWriter(coco_voc / COCO_SPLIT) as w:
        w.add(
            "000000000001",
            {"label": png_l(np.zeros((4, 4), np.uint8))},
            {"image_id": 1, "file_name": "000000000001.jpg", "width": 4, "height": 4},
        )
    with pytest.raises(
        PreprocessError, match=r"val2017\.zip: no member 'val2017/000000000001\.jpg'"
    ):
        run(write_tar(tmp / "voc.tar", files), tmp / "out", coco=(coco_voc, coco_dir))


# --- the DVC stage --------------------------------------------------------------------------------


def test_stage_runs_with_params(small, repo_root, capsys):
    from stages.preprocess import main

    tmp, train, val, files = small
    params = tiny_params({"preprocess.use_coco": False})
    write_params(tmp / "params.yaml", params)
    out = tmp / "pre"
    rc = main(
        [
            "--params",
            str(tmp / "params.yaml"),
            "--voc-tar",
            str(write_tar(tmp / "voc.tar", files)),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["max_size"] == params["preprocess"]["max_size"]
    assert report["train"]["records"] == len(train) and report["val"]["records"] == len(val)
    rc = main(
        [
            "--params",
            str(tmp / "params.yaml"),
            "--voc-tar",
            str(tmp / "nope.tar"),
            "--out",
            str(out),
        ]
    )
    assert rc == 1 and "nope.tar: VOC tar not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "max_bad_fraction" in capsys.readouterr().out


def test_missing_member_error_names_a_near_match(small):
    tmp, train, _, files = small
    member = f"{ROOT}/JPEGImages/{train[3]}.jpg"
    files[member.replace(".jpg", ".JPG")] = files.pop(member)  # saved with another case
    with pytest.raises(PreprocessError, match=rf"\(it has '.*JPEGImages/{train[3]}\.JPG'\)"):
        run(write_tar(tmp / "voc.tar", files), tmp / "out", max_bad_fraction=1.0)


# --- SBD as a training source ---------------------------------------------------------------


@pytest.fixture()
def voc_and_sbd(small):
    """The 6 + 2 real pairs as a VOC tar, and an SBD archive that re-annotates all 8 (255 ->
    0, as SBD has no void border) with SBD train = the 6 VOC train ids + the first VOC val id:
    like the real SBD, whose train set holds VOC 2012 val images."""
    from pipeline.data.sbd import write_sbd_tgz

    root, train, val, files = small
    tar = write_tar(root / "voc.tar", files)
    labels = {}
    for i in train + val:
        label = np.asarray(Image.open(io.BytesIO(files[f"{ROOT}/SegmentationClass/{i}.png"])))
        labels[i] = np.where(label == IGNORE_INDEX, 0, label).astype(np.uint8)
    images = {i: files[f"{ROOT}/JPEGImages/{i}.jpg"] for i in train + val}
    sbd = root / "benchmark.tgz"
    write_sbd_tgz(sbd, images, labels, {"train": train + val[:1], "val": val[1:]})
    return root, tar, sbd, train, val, labels


def test_sbd_train_noval_leaves_out_voc_val_images_and_the_report_says_so(voc_and_sbd):
    from pipeline.data.splits import check_no_overlap, overlap

    root, tar, sbd, train, val, labels = voc_and_sbd
    with_val = run(tar, root / "train", voc_train=False, sbd="train", sbd_tgz=sbd)
    noval = run(tar, root / "noval", voc_train=False, sbd="train_noval", sbd_tgz=sbd)
    assert with_val["train"]["by_source"] == {"sbd": 7}  # VOC train itself is off
    assert with_val["sbd_excluded_voc2012_val"] == 0
    assert noval["train"]["by_source"] == {"sbd": 6}
    assert noval["sbd_excluded_voc2012_val"] == 1
    assert noval["params"]["sbd"] == "train_noval" and noval["params"]["voc_train"] is False
    val_keys = [r["key"] for r in ShardReader(root / "noval" / "val").records]
    assert sorted(val_keys) == sorted(f"voc/{i}" for i in val)
    keys = {
        d: [r["key"] for r in ShardReader(root / d / "train").records] for d in ("train", "noval")
    }
    assert overlap(keys["noval"], val_keys) == []
    assert overlap(keys["train"], val_keys) == [val[0]]
    with pytest.raises(ValueError, match=val[0]):  # evaluate's last line of defence
        check_no_overlap(keys["train"], val_keys, "voc2012_val")


def test_sbd_labels_are_resized_nearest_from_the_mat_files(voc_and_sbd):
    root, tar, sbd, train, val, labels = voc_and_sbd
    run(tar, root / "out", sbd="train_noval", sbd_tgz=sbd)
    shards = ShardReader(root / "out" / "train")
    by_key = {r["key"]: i for i, r in enumerate(shards.records)}
    assert len(by_key) == 12  # 6 VOC train + the same 6 images' SBD annotations
    for i in train:
        got = decode_label(shards.blob(by_key[f"sbd/{i}"], "label"), i).numpy()
        want = resize_label(torch.from_numpy(labels[i]), got.shape).numpy()
        assert np.array_equal(got, want), i  # nearest: only the .mat's own ids
        assert IGNORE_INDEX not in got


def test_a_corrupt_sbd_mat_is_named_and_nothing_is_written(voc_and_sbd):
    from pipeline.data.sbd import SbdError

    root, tar, sbd, train, val, labels = voc_and_sbd
    member = f"benchmark_RELEASE/dataset/cls/{train[2]}.mat"
    broken = root / "broken.tgz"
    with tarfile.open(sbd) as src, tarfile.open(broken, "w:gz") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else None
            if info.name == member:
                data, info.size = b"MATLAB 5.0 garbage" * 8, 18 * 8
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    out = root / "out"
    with pytest.raises(SbdError, match=member):
        run(tar, out, sbd="train", sbd_tgz=broken)
    assert not out.exists()
    assert not list(root.glob(".out.*"))  # no temporary left either
