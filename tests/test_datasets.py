"""SegmentationShards and the decoders, on shards of real VOC files."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import tv_tensors

from pipeline.data.datasets import SegmentationShards, decode_image_rgb, decode_label, sample_seed
from pipeline.data.shards import ShardWriter
from pipeline.data.transforms import train_transform

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ids(voc_sample) -> list[str]:
    return (voc_sample / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:8]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, voc_sample, ids):
    """Original VOC bytes (palette label PNGs), shards of 3 records; record 1 as a gray JPEG +
    mode-L label, like a preprocessed COCO record."""
    out = tmp_path_factory.mktemp("ds") / "val"
    with ShardWriter(out, shard_size=3) as w:
        for k, i in enumerate(ids):
            jpg = (voc_sample / "JPEGImages" / f"{i}.jpg").read_bytes()
            png = (voc_sample / "SegmentationClass" / f"{i}.png").read_bytes()
            if k == 1:
                jpg = encode(Image.open(io.BytesIO(jpg)).convert("L"), "JPEG", quality=90)
                png = encode(Image.fromarray(np.asarray(Image.open(io.BytesIO(png))), "L"), "PNG")
            h, w_ = Image.open(io.BytesIO(png)).size[::-1]
            w.add(
                f"voc/{i}",
                {"image": jpg, "label": png},
                {"height": h, "width": w_, "source": "voc"},
            )
    return out


def test_decode_image_rgb_matches_pil(voc_sample, ids):
    for i in ids[:4]:
        data = (voc_sample / "JPEGImages" / f"{i}.jpg").read_bytes()
        ours = decode_image_rgb(data, i)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert ours.dtype == torch.uint8 and ours.shape == (3, *pil.shape[:2])
        assert np.abs(ours.permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_decode_image_rgb_gives_three_channels(voc_sample, ids, mode):
    img = Image.open(voc_sample / "JPEGImages" / f"{ids[0]}.jpg").convert(mode)
    data = encode(img, "PNG") if mode == "P" else encode(img, "JPEG", quality=90)
    out = decode_image_rgb(data, "x")
    assert out.shape == (3, img.height, img.width) and out.dtype == torch.uint8
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1


def test_decode_image_rgb_names_the_corrupt_input(voc_sample, ids):
    data = (voc_sample / "JPEGImages" / f"{ids[0]}.jpg").read_bytes()
    with pytest.raises(ValueError, match=r"^shard-3 'voc/x' image: corrupt image \(.*truncated"):
        decode_image_rgb(data[: len(data) // 2], "shard-3 'voc/x' image")
    with pytest.raises(ValueError, match=r"^a\.jpg: not a JPEG or PNG image"):
        decode_image_rgb(b"GIF89a....", "a.jpg")
    with pytest.raises(ValueError, match=r"^b\.jpg: not a JPEG or PNG image"):
        decode_image_rgb(b"", "b.jpg")


def test_decode_label_gives_palette_indices_not_colours(voc_sample, ids):
    data = (voc_sample / "SegmentationClass" / f"{ids[0]}.png").read_bytes()
    pil = Image.open(io.BytesIO(data))
    assert pil.mode == "P"
    label = decode_label(data, "x.png")
    assert label.dtype == torch.uint8 and label.ndim == 2
    np.testing.assert_array_equal(label.numpy(), np.asarray(pil))
    assert 255 in label


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: encode(p.convert("RGB"), "PNG"), "colour type 2"),
        (
            lambda p: encode(Image.fromarray(np.asarray(p).astype(np.uint16) * 3), "PNG"),
            "bit depth 16",
        ),
        (lambda p: encode(p.convert("RGB"), "JPEG"), "not a PNG"),
        (lambda p: encode(p, "PNG")[:200], "corrupt PNG"),
    ],
)
def test_decode_label_refuses_what_is_not_class_indices(voc_sample, ids, make, match):
    pil = Image.open(voc_sample / "SegmentationClass" / f"{ids[0]}.png")
    with pytest.raises(ValueError, match=rf"^lab\.png: .*{match}"):
        decode_label(make(pil), "lab.png")


def test_records_decode_to_image_and_int64_mask(shard_dir, voc_sample, ids):
    ds = SegmentationShards(shard_dir)
    assert len(ds) == len(ids) and [ds.key(i) for i in range(len(ds))] == [f"voc/{i}" for i in ids]
    for k, i in enumerate(ids):
        image, mask = ds[k]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
        assert image.shape == (3, *mask.shape) and ds.meta(k)["height"] == mask.shape[0]
        ref = np.asarray(Image.open(voc_sample / "SegmentationClass" / f"{i}.png"))
        np.testing.assert_array_equal(mask.numpy(), ref)
    gray, _ = ds[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert ds.key(-1) == f"voc/{ids[-1]}" and torch.equal(ds[-1][1], ds[len(ds) - 1][1])
    with pytest.raises(IndexError, match=f"index {len(ds)} out of range"):
        ds[len(ds)]
    assert len(list(iter(ds))) == len(ds)  # the old iteration protocol stops at IndexError


def test_sample_seed_depends_on_seed_epoch_and_index():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_transform_is_seeded_per_sample_and_epoch(shard_dir):
    t = train_transform(96, (0.5, 2.0), hflip=True, color_jitter=0.2)
    ds = SegmentationShards(shard_dir, transform=t, seed=5)
    a, b = ds[2], ds[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 96, 96) and a[1].dtype == torch.int64
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], a[0])
    other = SegmentationShards(shard_dir, transform=t, seed=6)
    assert not torch.equal(other[2][0], a[0])


def test_getitem_leaves_the_global_rng_alone(shard_dir):
    ds = SegmentationShards(shard_dir, transform=train_transform(64, (0.5, 2.0)))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ds[0], ds[3]
    assert torch.equal(torch.rand(4), expected)


def test_dataloader_batches_do_not_depend_on_worker_count(shard_dir):
    ds = SegmentationShards(shard_dir, transform=train_transform(64, (0.5, 2.0), True, 0.1), seed=1)
    ds.set_epoch(2)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=workers)
        runs.append(list(loader))
    assert len(runs[0]) == 3
    for (x0, y0), (x1, y1) in zip(*runs, strict=True):
        assert x0.shape[1:] == (3, 64, 64) and y0.dtype == torch.int64
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_pickles_after_use_and_splits_across_ranks(shard_dir):
    ds = SegmentationShards(shard_dir)
    first = ds[4]  # opens a shard descriptor
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4][0], first[0])
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        for i in sampler:
            seen.append(i)
            assert torch.equal(clone[i][1], ds[i][1])
    assert sorted(seen) == list(range(len(ds)))
