"""Augmentation: label maps keep their class ids, image and mask stay aligned, seeds reproduce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torchvision import tv_tensors

from pipeline.classes import IGNORE_INDEX, voc_palette
from pipeline.data.datasets import decode_image_rgb, decode_label
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_FILL,
    eval_transform,
    normalize,
    train_transform,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]


MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255


def real_pairs(voc_sample, n: int = 6):
    ids = (
        (voc_sample / "ImageSets" / "Segmentation" / "train.txt")
        .read_text()
        .split()[:: 76 // n][:n]
    )
    for i in ids:
        image = decode_image_rgb((voc_sample / "JPEGImages" / f"{i}.jpg").read_bytes(), i)
        mask = decode_label((voc_sample / "SegmentationClass" / f"{i}.png").read_bytes(), i)
        yield i, tv_tensors.Image(image), tv_tensors.Mask(mask)


def test_normalize_is_imagenet_mean_std_on_rgb_0_1():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - MEAN) / STD)
    assert normalize(
        torch.full((3, 1, 1), 255, dtype=torch.uint8)
    ).flatten().tolist() == pytest.approx(
        [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    )
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize(x[:, :2])


def test_eval_transform_normalises_only_at_full_size(voc_sample):
    _, image, mask = next(real_pairs(voc_sample))
    x, y = eval_transform()(image, mask)
    torch.testing.assert_close(x.as_subclass(torch.Tensor), normalize(image), rtol=0, atol=0)
    assert y.dtype == torch.int64 and torch.equal(y, mask.long())
    assert isinstance(x, tv_tensors.Image) and isinstance(y, tv_tensors.Mask)


def test_train_transform_on_real_masks_invents_no_class(voc_sample):
    t = train_transform(320, (0.5, 2.0), hflip=True, color_jitter=0.3)
    for name, image, mask in real_pairs(voc_sample):
        allowed = set(mask.unique().tolist()) | {IGNORE_INDEX}
        for seed in range(6):
            torch.manual_seed(seed)
            x, y = t(image, mask)
            assert x.shape == (3, 320, 320) and x.dtype == torch.float32
            assert y.shape == (320, 320) and y.dtype == torch.int64
            new = set(y.unique().tolist()) - allowed
            assert not new, f"{name} seed {seed}: invented class ids {new}"


def test_image_and_mask_stay_aligned_through_scale_crop_flip():
    # colour encodes the class: 16 px blocks of classes 0..20, each in its VOC palette colour
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 21, (5, 9), generator=g, dtype=torch.uint8)
    mask = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:75, :140]  # 75x140: padded
    palette = torch.from_numpy(voc_palette(256)).to(torch.int16)
    image = palette[mask.long()].permute(2, 0, 1).to(torch.uint8).contiguous()
    t = train_transform(96, (0.5, 2.0), hflip=True, color_jitter=0.0)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        rgb = unnormalize(x)
        pad = y == IGNORE_INDEX  # the source has no 255: every 255 is crop padding
        assert x[:, pad].abs().max() < 0.01 if pad.any() else True  # mean fill -> ~0
        # away from block edges (and resampling blur) the colour is the class's colour
        yf = y.float()[None, None]
        lo, hi = -TF.max_pool2d(-yf, 7, 1, 3)[0, 0], TF.max_pool2d(yf, 7, 1, 3)[0, 0]
        interior = (lo == hi) & ~pad
        expect = palette[y.clamp(max=255)].permute(2, 0, 1).float()
        diff = (rgb - expect).abs().amax(0)[interior]
        assert diff.max() <= 3, f"seed {seed}: image and mask disagree by {diff.max():.1f}"
        checked += int(interior.sum())
    assert checked > 40 * 96 * 96 // 4


def test_same_seed_same_sample_different_seed_different(voc_sample):
    _, image, mask = next(real_pairs(voc_sample))
    t = train_transform(128, (0.5, 2.0), hflip=True, color_jitter=0.2)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(t(image, mask))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_colour_jitter_changes_the_image_not_the_geometry(voc_sample):
    _, image, mask = next(real_pairs(voc_sample))
    out = {}
    for cj in (0.0, 0.4):
        torch.manual_seed(11)  # the geometry is drawn before the jitter: same crop and flip
        out[cj] = train_transform(128, (0.5, 2.0), True, cj)(image, mask)
    assert torch.equal(out[0.0][1], out[0.4][1])
    assert (out[0.0][0] - out[0.4][0]).abs().mean() > 0.05


def test_crop_pads_image_with_mean_and_mask_with_255():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.randint(0, 21, (20, 30), dtype=torch.uint8)
    torch.manual_seed(0)
    x, y = train_transform(64, (1.0, 1.0), hflip=False)(image, mask)
    inside = (y != IGNORE_INDEX).nonzero()
    top, left = inside.min(0).values.tolist()
    assert (inside.max(0).values - inside.min(0).values).tolist() == [19, 29]
    assert torch.equal(y[top : top + 20, left : left + 30], mask.long())
    torch.testing.assert_close(x[:, top : top + 20, left : left + 30], normalize(image))
    assert int((y == IGNORE_INDEX).sum()) == 64 * 64 - 20 * 30
    fill = normalize(torch.tensor(MEAN_FILL, dtype=torch.uint8).view(3, 1, 1))
    assert fill.abs().max() < 0.01 and torch.allclose(x[:, 0, 0], fill[:, 0, 0])


def test_plain_tensor_mask_is_still_resized_nearest(voc_sample):
    _, image, mask = next(real_pairs(voc_sample))
    plain = mask.as_subclass(torch.Tensor)
    allowed = set(plain.unique().tolist()) | {IGNORE_INDEX}
    for seed in range(4):
        torch.manual_seed(seed)
        _, y = train_transform(200, (0.37, 0.63), True)(image.as_subclass(torch.Tensor), plain)
        assert set(y.unique().tolist()) <= allowed and y.shape == (200, 200)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 0}, "crop_size"),
        ({"crop_size": 64, "scale_range": (2.0, 1.0)}, "scale_range"),
        ({"crop_size": 64, "color_jitter": 1.5}, "color_jitter"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform(**kwargs)
