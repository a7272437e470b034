"""The paper's initialisations and weight transfers (pipeline.models.surgery)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from pipeline.models import build_model
from pipeline.models.surgery import (
    VGG16_CONV_INDICES,
    bilinear_kernel,
    fix_upsampling,
    init_random,
    load_vgg16_backbone,
    random_vgg16_state_dict,
    transplant,
    zero_init_scores,
)

SMALL = 1 / 16
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


# --- bilinear upsampling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "profile"),
    [
        (4, [1 / 4, 3 / 4, 3 / 4, 1 / 4]),
        (16, [(2 * i + 1) / 16 for i in range(8)] + [(15 - 2 * i) / 16 for i in range(8)]),
        (3, [1 / 2, 1, 1 / 2]),  # odd sizes: centred on the middle tap
    ],
)
def test_bilinear_kernel_closed_form(k: int, profile: list[float]) -> None:
    w = bilinear_kernel(3, 3, k)
    assert w.shape == (3, 3, k, k) and w.dtype == torch.float32
    p = torch.tensor(profile)
    for i in range(3):
        for j in range(3):
            want = torch.outer(p, p) if i == j else torch.zeros(k, k)
            torch.testing.assert_close(w[i, j], want)


def test_bilinear_kernel_needs_matching_channels() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        bilinear_kernel(3, 4, 4)


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_bilinear_upsampling_keeps_constants_and_ramps(factor: int) -> None:
    """Stride f, kernel 2f: a constant image stays constant inside (one input pixel from each
    border has a single contributor) and a linear ramp is interpolated exactly."""
    k, n = 2 * factor, 6
    w = bilinear_kernel(3, 3, k)
    const = torch.tensor([0.5, -2.0, 7.0])[None, :, None, None].expand(1, 3, n, n)
    up = F.conv_transpose2d(const, w, stride=factor)
    assert up.shape == (1, 3, (n + 1) * factor, (n + 1) * factor)
    inner = up[..., factor:-factor, factor:-factor]
    torch.testing.assert_close(inner, const[..., :1, :1].expand_as(inner))
    # ramp along W: output j sits at input coordinate (j - (k-1)/2) / f
    ramp = torch.arange(n, dtype=torch.float32).expand(1, 1, n, n)
    up = F.conv_transpose2d(ramp, bilinear_kernel(1, 1, k), stride=factor)
    j = torch.arange(up.shape[-1], dtype=torch.float32)
    torch.testing.assert_close(
        up[0, 0, factor:-factor, factor:-factor],
        ((j - (k - 1) / 2) / factor)[factor:-factor].expand(up.shape[-2] - 2 * factor, -1),
    )


# --- zero and random initialisation ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
def test_only_score_layers_start_at_zero(arch: str) -> None:
    model = build_model(arch, width=SMALL)
    init_random(model, seed=1)
    zero = sorted(n for n, p in model.named_parameters() if p.detach().abs().sum() == 0)
    scores = {"fcn32s": ["score_fr"], "fcn16s": ["score_fr", "score_pool4"]}.get(
        arch, ["score_fr", "score_pool3", "score_pool4"]
    )
    conv_biases = [f"features.{i}.bias" for i in VGG16_CONV_INDICES] + ["fc6.bias", "fc7.bias"]
    assert zero == sorted([f"{s}.{p}" for s in scores for p in ("weight", "bias")] + conv_biases)
    assert sorted(zero_init_scores(model)) == scores


def test_zero_init_scores_needs_score_layers() -> None:
    with pytest.raises(ValueError, match="no score layers"):
        zero_init_scores(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_init_random_is_he_init_deterministic_and_keeps_global_rng() -> None:
    a, b, c = (build_model("fcn16s", width=0.125) for _ in range(3))
    state = torch.random.get_rng_state()
    init_random(a, seed=7)
    init_random(b, seed=7)
    init_random(c, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc6.weight"], sc["fc6.weight"])
    for name in ("features.0.weight", "features.28.weight", "fc6.weight", "fc7.weight"):
        w = sa[name]
        want = (2.0 / w[0].numel()) ** 0.5  # He: std sqrt(2 / fan_in)
        assert abs(w.std().item() / want - 1) < 0.1, name
    assert torch.equal(sa["upscore2.weight"], bilinear_kernel(21, 21, 4))
    assert torch.equal(sa["upscore16.weight"], bilinear_kernel(21, 21, 32))


# --- VGG16 weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_vgg16() -> nn.Module:
    """A randomly initialised torchvision VGG16 (138M parameters), eval mode."""
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def test_random_vgg16_state_dict_has_torchvision_layout(torchvision_vgg16: nn.Module) -> None:
    ours = random_vgg16_state_dict(1.0, seed=0)
    theirs = torchvision_vgg16.state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    small = random_vgg16_state_dict(0.125, seed=0)
    assert small["features.0.weight"].shape == (8, 3, 3, 3)
    assert small["classifier.0.weight"].shape == (512, 64 * 7 * 7)
    assert small["classifier.6.weight"].shape == (1000, 512)
    again = random_vgg16_state_dict(0.125, seed=0)
    assert all(torch.equal(small[k], again[k]) for k in small)
    assert not torch.equal(
        small["features.0.weight"], random_vgg16_state_dict(0.125, 1)["features.0.weight"]
    )


def test_fc6_fc7_convolutions_equal_the_vgg16_classifier(torchvision_vgg16: nn.Module) -> None:
    """Convolutionalization: on a 224x224 input, conv fc7 == Linear fc7 (after ReLU)."""
    vgg = torchvision_vgg16
    model = build_model("fcn32s", width=1.0).eval()
    copied = load_vgg16_backbone(model, vgg.state_dict(), source="torchvision vgg16")
    assert len(copied) == 2 * 13 + 4
    for i in VGG16_CONV_INDICES:
        assert torch.equal(model.features[i].weight, vgg.features[i].weight)
        assert torch.equal(model.features[i].bias, vgg.features[i].bias)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool5 = vgg.features(x)  # [1, 512, 7, 7]
        linear = vgg.classifier[:5](torch.flatten(vgg.avgpool(pool5), 1))  # fc6 relu drop fc7 relu
        conv = model.relu7(model.fc7(model.relu6(model.fc6(pool5))))
    assert conv.shape == (1, 4096, 1, 1)
    assert (linear > 0).sum() > 100  # not a trivially dead layer
    # Same weights, different kernels (conv vs addmm) summing in a different order: fc6 is a
    # 25,088-term fp32 dot product (fc7: 4,096 terms). Rounding errors of n terms add like a
    # random walk, so the difference is about sqrt(n) * eps * (the size of the result); with
    # n = 25,088 that is 1.9e-5 of the output scale. Measured over seeds 0-3: 1.3-1.5e-6 at an
    # output scale of 0.63, i.e. 1/8 of this tolerance; a fixed atol 1e-6 sat below it.
    n, eps = 512 * 7 * 7, torch.finfo(torch.float32).eps
    tol = n**0.5 * eps
    torch.testing.assert_close(
        conv.flatten(1), linear, rtol=tol, atol=tol * linear.abs().max().item()
    )
    del model


def test_load_vgg16_backbone_any_width() -> None:
    sd = random_vgg16_state_dict(0.125, seed=3)
    model = build_model("fcn8s", width=0.125).eval()
    load_vgg16_backbone(model, sd)
    pool5 = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        linear = F.relu(
            F.linear(pool5.flatten(1), sd["classifier.0.weight"], sd["classifier.0.bias"])
        )
        linear = F.relu(F.linear(linear, sd["classifier.3.weight"], sd["classifier.3.bias"]))
        conv = model.relu7(model.fc7(model.relu6(model.fc6(pool5))))
    torch.testing.assert_close(conv.flatten(1), linear)
    assert torch.equal(model.features[28].weight, sd["features.28.weight"])


def test_load_vgg16_backbone_errors_name_key_and_shapes() -> None:
    model = build_model("fcn32s", width=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong_width = random_vgg16_state_dict(0.125, seed=0)
    with pytest.raises(
        ValueError,
        match=r"vgg16\.pth: features\.0\.weight has shape \(8, 3, 3, 3\).*\(4, 3, 3, 3\)",
    ):
        load_vgg16_backbone(model, wrong_width, source="data/raw/vgg16/vgg16.pth")
    sd = random_vgg16_state_dict(SMALL, seed=0)
    sd["classifier.0.weight"] = sd["classifier.0.weight"][:, :-1]
    with pytest.raises(
        ValueError, match=r"classifier\.0\.weight has shape \(256, 1567\).*\(256, 1568\)"
    ):
        load_vgg16_backbone(model, sd, source="x.pth")
    del sd["features.10.bias"]
    with pytest.raises(ValueError, match=r"x\.pth: missing key 'features\.10\.bias'"):
        load_vgg16_backbone(model, sd, source="x.pth")
    sd = random_vgg16_state_dict(SMALL, seed=0)
    sd["fc7"] = sd.pop("classifier.3.weight")
    with pytest.raises(ValueError, match="classifier.3.weight"):
        load_vgg16_backbone(model, sd)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-copied


# --- staged training: transplant -------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_image(voc_sample) -> torch.Tensor:
    """A real VOC image, normalised like torchvision's VGG16 input."""
    path = sorted((voc_sample / "JPEGImages").glob("*.jpg"))[0]
    rgb = np.array(Image.open(path).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    return ((x - IMAGENET_MEAN) / IMAGENET_STD)[None]


def _randomise(layer: nn.Conv2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)


def _agreement(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float, float]:
    """(all pixels, decided pixels, share decided): argmax agreement. A pixel is decided when
    its top-1 score beats the top-2 by over 2% of the mean score range; near-ties of a random
    network flip under any change of the upsampling, decided pixels must not."""
    same = before.argmax(1) == after.argmax(1)
    top2 = before.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.02 * (before.amax(1) - before.amin(1)).mean()
    return (
        same.float().mean().item(),
        same[decided].float().mean().item(),
        decided.float().mean().item(),
    )


def _best_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    errs = {}
    for dy, dx in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]:
        h, w = a.shape[-2:]
        errs[(dy, dx)] = (
            (a[..., 2:-2, 2:-2] - b[..., 2 + dy : h - 2 + dy, 2 + dx : w - 2 + dx]).abs().mean()
        )
    return min(errs, key=errs.get)


@pytest.mark.parametrize("seed", [0, 2])
def test_transplant_stages_predict_like_their_parent(voc_image: torch.Tensor, seed: int) -> None:
    """FCN-16s from FCN-32s (and FCN-8s from FCN-16s) starts from its parent's predictions:
    the new skip scores are zero and 2x-then-16x bilinear approximates 32x bilinear (it only
    cuts the corners within 1/8 of a score_fr cell around each cell centre)."""
    fcn32 = build_model("fcn32s", width=SMALL)
    init_random(fcn32, seed)
    _randomise(fcn32.score_fr, seed + 100)  # a non-zero, random classifier
    fcn16 = build_model("fcn16s", width=SMALL)
    copied = transplant(fcn32, fcn16)
    assert sorted(copied) == sorted(
        [f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")]
        + [f"{m}.{p}" for m in ("fc6", "fc7", "score_fr") for p in ("weight", "bias")]
    )
    assert fcn16.score_pool4.weight.abs().sum() == 0
    assert torch.equal(fcn16.upscore2.weight, bilinear_kernel(21, 21, 4))

    _randomise(fcn16.score_pool4, seed + 200)  # make FCN-16s differ from its parent
    fcn8 = build_model("fcn8s", width=SMALL)
    copied = transplant(fcn16, fcn8)
    assert {"score_pool4.weight", "upscore2.weight"} <= set(copied)
    assert "upscore16.weight" not in copied and fcn8.score_pool3.weight.abs().sum() == 0

    with torch.no_grad():
        s32, s8 = fcn32.eval()(voc_image), fcn8.eval()(voc_image)
        s16 = fcn16.eval()(voc_image)
        fcn16.score_pool4.weight.zero_()
        fcn16.score_pool4.bias.zero_()
        s16_fresh = fcn16(voc_image)  # FCN-16s right after the transplant
    for parent, child in [(s32, s16_fresh), (s16, s8)]:
        overall, decided, share = _agreement(parent, child)
        print(
            f"argmax agreement: {overall:.4f} of all pixels, {decided:.4f} of the {share:.0%} decided"
        )
        assert decided >= 0.99 and share >= 0.75 and overall >= 0.95
        assert _best_shift(parent, child) == (0, 0)  # aligned, not off by a pixel


def test_transplant_refuses_shape_mismatch_and_unrelated_models() -> None:
    src = build_model("fcn32s", num_classes=10, width=SMALL)
    dst = build_model("fcn16s", num_classes=21, width=SMALL)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"score_fr\.weight: \(10, 256, 1, 1\) vs \(21, 256, 1, 1\)"
    ):
        transplant(src, dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    with pytest.raises(ValueError, match="no parameter names in common"):
        transplant(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


# --- the release's fixed upsampling ---------------------------------------------------------


@pytest.mark.parametrize(
    "arch, layers",
    [
        ("fcn32s", ["upscore"]),
        ("fcn16s", ["upscore2", "upscore16"]),
        ("fcn8s", ["upscore2", "upscore_pool4", "upscore8"]),
    ],
)
def test_fix_upsampling_freezes_every_upsampling_layer_and_nothing_else(arch, layers) -> None:
    from pipeline.training.solver import param_groups

    model = build_model(arch, 21, SMALL)
    learned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fix_upsampling(model) == layers
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{name}.weight" for name in layers}
    assert learned - frozen == {n for n, p in model.named_parameters() if p.requires_grad}
    in_optimiser = {id(p) for g in param_groups(model, 5e-4) for p in g["params"]}
    assert all(id(p) not in in_optimiser for n, p in model.named_parameters() if n in frozen)
