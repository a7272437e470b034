"""FCN-32s/16s/8s and FCN-8s at-once: shapes, crop geometry, parameter counts, precision/layout,
model files, and the at-once net's fixed skip scales."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import (
    NET_CLASSES,
    FCN8s,
    FCN8sAtOnce,
    ModelFileError,
    build_model,
    load_model,
    save_model,
)
from pipeline.models.fcn import POOL3, POOL4
from pipeline.models.surgery import (
    init_random,
    load_vgg16_backbone,
    random_vgg16_state_dict,
    transplant,
)
from tests.helpers import PlantedCode

ARCHS = list(NET_CLASSES)
SMALL = 1 / 16  # conv channels 4..32, fc6/fc7 256: fast on 2 cores


def _randomise_scores(model: nn.Module, seed: int = 123) -> nn.Module:
    """Non-zero score layers, so predictions depend on the whole network. A skip whose input
    the model scales (FCN-8s at-once) gets weights 1/scale larger, as training makes them, so
    that it weighs in the logits as much as in the other nets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.startswith("score"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for pool, s in model.skip_scales.items():
            getattr(model, f"score_{pool}").weight.div_(s)
    return model


def _small(arch: str, seed: int = 0) -> nn.Module:
    model = build_model(arch, width=SMALL)
    init_random(model, seed)
    return _randomise_scores(model).eval()


# --- shapes and attributes -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_output_has_input_size_for_any_size(arch: str) -> None:
    model = _small(arch)
    with torch.no_grad():
        for h, w in [(1, 1), (33, 47), (127, 129), (200, 300)]:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 21, h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_attributes(arch: str) -> None:
    model = build_model(arch, num_classes=5, width=0.25)
    assert (model.arch, model.num_classes, model.width) == (arch, 5, 0.25)
    assert model.normalization == "imagenet"
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 5, 40, 40)


def test_build_model_rejects_unknown_names_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="fcn32s, fcn16s, fcn8s"):
        build_model("fcn4s")
    with pytest.raises(ValueError, match="width"):
        build_model("fcn8s", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("fcn8s", num_classes=0)
    model = build_model("fcn32s", width=SMALL)
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        model(torch.randn(1, 1, 32, 32))


def test_width_multiplier_rounds_and_keeps_one_channel() -> None:
    model = build_model("fcn8s", width=0.125)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert model.fc6.out_channels == model.fc7.out_channels == 512
    tiny = build_model("fcn8s", width=0.001)  # every conv 1 channel, fc6/fc7 4
    assert {m.out_channels for m in tiny.features if isinstance(m, nn.Conv2d)} == {1}
    assert tiny.fc6.out_channels == 4
    assert tiny(torch.randn(1, 3, 21, 17)).shape == (1, 21, 21, 17)


# --- crop offsets: derived from the modules' geometry, then checked by symmetry --------------


def _pair(v: int | tuple[int, ...]) -> int:
    return v[0] if isinstance(v, tuple) else v


def _chain(modules: list[nn.Module], a: float = 1.0, b: float = 0.0) -> tuple[float, float]:
    """Map output index j of the chain to input coordinate a*j + b (window centres)."""
    for m in modules:
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.ConvTranspose2d):
            k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
            if isinstance(m, nn.ConvTranspose2d):  # output j <- input (j + p - (k-1)/2) / s
                a, b = a / s, b + a * (p - (k - 1) / 2) / s
            else:  # output j <- input window centred at s*j - p + (k-1)/2
                a, b = a * s, b + a * (-p + (k - 1) / 2)
    return a, b


def _skip_crop(skip: tuple[float, float], up: tuple[float, float]) -> float:
    assert skip[0] == up[0], "skip and upsampled maps must share a stride"
    return (up[1] - skip[1]) / skip[0]


def _out_crop(up: tuple[float, float]) -> float:
    assert up[0] == 1, "the output must have stride 1"
    return -up[1]


def test_crop_offsets_follow_from_layer_geometry() -> None:
    derived = {}
    for arch in ARCHS:
        m = build_model(arch, width=SMALL)
        feats = list(m.features)
        pool3, pool4 = _chain(feats[: POOL3 + 1]), _chain(feats[: POOL4 + 1])
        score_fr = _chain([*feats, m.fc6, m.fc7, m.score_fr])
        if arch == "fcn32s":
            crops = {"upscore": _out_crop(_chain([m.upscore], *score_fr))}
        else:
            up2 = _chain([m.upscore2], *score_fr)
            crops = {"score_pool4": _skip_crop(pool4, up2)}
            if arch == "fcn16s":
                crops["upscore16"] = _out_crop(_chain([m.upscore16], *up2))
            else:
                up4 = _chain([m.upscore_pool4], *up2)
                crops["score_pool3"] = _skip_crop(pool3, up4)
                crops["upscore8"] = _out_crop(_chain([m.upscore8], *up4))
        assert crops == m.crops, arch
        derived[arch] = crops
    # the offsets of the Caffe release (and pytorch-fcn)
    assert derived == {
        "fcn32s": {"upscore": 19},
        "fcn16s": {"score_pool4": 5, "upscore16": 27},
        "fcn8s": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
        "fcn8s_atonce": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
    }


def _mirror_symmetric(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_crops_are_centred_mirror_symmetry(arch: str) -> None:
    """With left-right symmetric kernels and a width where every pool halves exactly
    (122 + 198 = 320 = 10 * 32), mirroring the input must mirror the output: any crop
    that is off by one pixel breaks this."""
    model = _mirror_symmetric(_small(arch))
    x = torch.randn(1, 3, 45, 122)
    with torch.no_grad():
        out, out_flipped = model(x), model(x.flip(-1)).flip(-1)
        assert torch.allclose(out, out_flipped, atol=1e-5 * out.abs().max().item())
        for layer in model.crops:  # control: a one-pixel shift of any crop is detected
            model.crops = {**type(model).crops, layer: type(model).crops[layer] + 1}
            shifted = model(x.flip(-1)).flip(-1)
            assert not torch.allclose(model(x), shifted, atol=1e-3 * out.abs().max().item())
        model.crops = type(model).crops


# --- parameter counts ----------------------------------------------------------------------


def _caffe_count(arch: str, width: float = 1.0, n: int = 21) -> int:
    """Layer by layer from the Caffe release's net.py (voc-fcn{32,16,8}s, voc-fcn8s-atonce):
    convs with bias, Deconvolution without (bias_term: false), fc6 7x7, fc7 1x1. The at-once
    net's Scale layers (lr_mult 0, constant filler) are fixed constants, not parameters."""
    arch = "fcn8s" if arch == "fcn8s_atonce" else arch
    c = [max(1, int(v * width + 0.5)) for v in (64, 64, 128, 128, 256, 256, 256)]
    c += [max(1, int(v * width + 0.5)) for v in (512,) * 6]
    fc = max(1, int(4096 * width + 0.5))
    total = sum(ci * co * 9 + co for ci, co in zip([3, *c[:-1]], c, strict=True))
    total += c[-1] * fc * 49 + fc + fc * fc + fc + fc * n + n  # fc6, fc7, score_fr
    deconv = {"fcn32s": [64], "fcn16s": [4, 32], "fcn8s": [4, 4, 16]}[arch]
    total += sum(n * n * k * k for k in deconv)
    skips = {"fcn32s": [], "fcn16s": [c[9]], "fcn8s": [c[9], c[6]]}[arch]
    total += sum(ci * n + n for ci in skips)
    return total


def _count(arch: str, width: float) -> int:
    with torch.device("meta"):  # no memory, no init time
        return sum(p.numel() for p in build_model(arch, width=width).parameters())


def test_parameter_counts_match_caffe_and_pytorch_fcn() -> None:
    counts = {arch: _count(arch, 1.0) for arch in ARCHS}
    print("full-width parameter counts (21 classes):", counts)
    assert counts["fcn8s"] == 134_489_759  # pytorch-fcn FCN8s (NOTES.md)
    assert counts == {a: _caffe_count(a) for a in ARCHS}
    assert counts == {
        "fcn32s": 136_152_917,
        "fcn16s": 134_815_994,
        "fcn8s": 134_489_759,
        "fcn8s_atonce": 134_489_759,
    }
    assert _count("fcn8s", 0.125) == 2_239_207 == _caffe_count("fcn8s", 0.125)  # NOTES.md


def test_only_the_final_upsampling_is_fixed() -> None:
    fixed = {
        arch: sorted(
            n for n, p in build_model(arch, width=SMALL).named_parameters() if not p.requires_grad
        )
        for arch in ARCHS
    }
    assert fixed == {
        "fcn32s": ["upscore.weight"],
        "fcn16s": ["upscore16.weight"],
        "fcn8s": ["upscore8.weight"],
        "fcn8s_atonce": ["upscore8.weight"],
    }


# --- training behaviour, memory format, precision --------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_trainable_layer_learns_from_init_random(arch: str) -> None:
    """Zero score layers block the gradient for one step only; after that every trainable
    parameter gets a gradient and the fixed upsampling never moves."""
    torch.manual_seed(0)
    model = build_model(arch, width=SMALL)
    init_random(model, seed=0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 21, (2, 64, 64))
    y[:, :4] = 255
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    dead = [
        n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0
    ]
    assert dead == []
    for n, p in model.named_parameters():
        if n in fixed:
            assert p.grad is None and torch.equal(p, fixed[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_gives_the_same_output(arch: str) -> None:
    model = _small(arch)
    x = torch.randn(2, 3, 57, 71)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_on_cpu(arch: str) -> None:
    model = _small(arch).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 80).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05  # bf16 keeps ~3 significant digits


# --- FCN-8s at-once: fixed skip scales ------------------------------------------------------

# voc-fcn8s-atonce/net.py: Scale layers with a constant filler and lr_mult 0
ATONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}


def _atonce_pair(seed: int = 0, width: float = SMALL) -> tuple[nn.Module, nn.Module]:
    """An FCN8sAtOnce and an FCN8s that must compute the same function: the same weights,
    except FCN8s's score_pool4/score_pool3 weights carry the scales. The at-once skip weights
    are 1/scale larger (`_randomise_scores`), so each skip moves the logits by about as much
    as score_fr does and a wrong scale shows."""
    atonce = build_model("fcn8s_atonce", width=width)
    init_random(atonce, seed)
    _randomise_scores(atonce, seed)
    plain = build_model("fcn8s", width=width)
    with torch.no_grad():
        plain.load_state_dict(atonce.state_dict())
        for pool, s in ATONCE_SCALES.items():
            getattr(plain, f"score_{pool}").weight.mul_(s)
    return atonce.eval(), plain.eval()


@pytest.mark.parametrize("width", [1 / 8, 1 / 16, 0.001])
def test_atonce_output_has_input_size_at_odd_sizes(width: float) -> None:
    model = build_model("fcn8s_atonce", width=width)
    init_random(model, seed=0)
    model = _randomise_scores(model).eval()
    with torch.no_grad():
        for h, w in [(1, 3), (97, 131), (31, 1)]:
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 21, h, w)
            assert torch.isfinite(out).all()


def test_atonce_equals_fcn8s_with_scaled_skip_weights() -> None:
    atonce, plain = _atonce_pair()
    x = torch.randn(2, 3, 61, 83)
    with torch.no_grad():
        out, ref = atonce(x), plain(x)
        tol = 1e-5 * ref.abs().max().item()
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)
        # control: the comparison sees each scale: 10% off, or no scale at all, is far out
        for pool, s in ATONCE_SCALES.items():
            weight = getattr(plain, f"score_{pool}").weight
            saved = weight.clone()
            for factor in (1.1, 1 / s):
                weight.copy_(saved * factor)
                assert (atonce(x) - plain(x)).abs().max() > 100 * tol, (pool, factor)
            weight.copy_(saved)


def test_atonce_scales_are_fixed_class_constants() -> None:
    atonce, fcn8s = build_model("fcn8s_atonce", width=SMALL), build_model("fcn8s", width=SMALL)
    assert isinstance(atonce, FCN8s) and atonce.arch == "fcn8s_atonce"
    assert dict(FCN8sAtOnce.skip_scales) == ATONCE_SCALES and dict(FCN8s.skip_scales) == {}
    with pytest.raises(TypeError):
        FCN8sAtOnce.skip_scales["pool3"] = 1.0  # read-only
    # nothing of its own: parameters, buffers and state dict are FCN8s's
    assert [(k, v.shape) for k, v in atonce.state_dict().items()] == [
        (k, v.shape) for k, v in fcn8s.state_dict().items()
    ]
    assert [n for n, _ in atonce.named_parameters()] == [n for n, _ in fcn8s.named_parameters()]
    assert list(atonce.named_buffers()) == []
    assert not any("scale" in k for k in atonce.state_dict())

    # a training step moves the weights and leaves the scales as they were
    atonce, _ = _atonce_pair(seed=1)
    atonce.train()
    before = {k: v.clone() for k, v in atonce.state_dict().items()}
    opt = torch.optim.SGD([p for p in atonce.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(2, 3, 48, 56), torch.randint(0, 21, (2, 48, 56))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(atonce(x), y).backward()
        opt.step()
    after = atonce.state_dict()
    assert list(after) == list(before) and not any("scale" in k for k in after)
    params = dict(atonce.named_parameters())
    for k in ("score_pool4.weight", "score_pool3.weight", "features.0.weight"):
        assert params[k].grad.abs().sum() > 0, k  # the skips learn (at lr * scale^2)
    for k in ("score_pool4.weight", "features.0.weight"):
        assert not torch.equal(after[k], before[k]), k
    assert dict(atonce.skip_scales) == ATONCE_SCALES
    # ... and the trained net still applies exactly 0.01 and 0.0001
    atonce.eval()
    plain = build_model("fcn8s", width=SMALL).eval()
    with torch.no_grad():
        plain.load_state_dict(after)
        for pool, s in ATONCE_SCALES.items():
            getattr(plain, f"score_{pool}").weight.mul_(s)
        ref = plain(x)
        torch.testing.assert_close(atonce(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_atonce_save_load_round_trip(tmp_path) -> None:
    atonce, _ = _atonce_pair()
    path = tmp_path / "fcn8s_atonce.pt"
    save_model(path, atonce, epoch=2)
    raw = torch.load(path, weights_only=True)
    assert (raw["arch"], raw["width"], raw["normalization"]) == ("fcn8s_atonce", SMALL, "imagenet")
    assert list(raw["state_dict"]) == list(build_model("fcn8s", width=SMALL).state_dict())
    loaded = load_model(path)
    assert type(loaded) is FCN8sAtOnce and loaded.meta == {"epoch": 2} and not loaded.training
    x = torch.randn(1, 3, 45, 59)
    with torch.no_grad():
        assert torch.equal(loaded(x), atonce(x))


def test_atonce_takes_vgg16_backbone_and_transplant_like_fcn8s() -> None:
    vgg = random_vgg16_state_dict(SMALL, seed=0)
    atonce, fcn8s = build_model("fcn8s_atonce", width=SMALL), build_model("fcn8s", width=SMALL)
    keys = load_vgg16_backbone(atonce, vgg)
    assert keys == load_vgg16_backbone(fcn8s, vgg) and {"fc6.weight", "fc7.bias"} <= set(keys)
    assert torch.equal(atonce.features[0].weight, vgg["features.0.weight"])
    assert torch.equal(atonce.fc6.weight, vgg["classifier.0.weight"].view_as(atonce.fc6.weight))
    for k in keys:
        assert torch.equal(atonce.state_dict()[k], fcn8s.state_dict()[k]), k
    # staged weights carry over by name: from FCN-16s as into FCN-8s, from FCN-8s everything
    fcn16s = _small("fcn16s")
    assert transplant(fcn16s, atonce) == transplant(fcn16s, fcn8s)
    src = _small("fcn8s", seed=1)
    assert sorted(transplant(src, atonce)) == sorted(atonce.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(atonce.state_dict()[k], v), k


# --- model files -----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path) -> None:
    model = _small("fcn8s")
    path = tmp_path / "models" / "fcn8s.pt"
    save_model(path, model, epoch=3, miou=0.5, history=[0.1, 0.2], params={"lr": 1e-10})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert {k: raw[k] for k in ("arch", "num_classes", "width", "normalization")} == {
        "arch": "fcn8s",
        "num_classes": 21,
        "width": SMALL,
        "normalization": "imagenet",
    }
    loaded = load_model(path)
    assert not loaded.training and isinstance(loaded, type(model))
    assert loaded.meta == {"epoch": 3, "miou": 0.5, "history": [0.1, 0.2], "params": {"lr": 1e-10}}
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == ["upscore8.weight"]
    x = torch.randn(1, 3, 50, 61)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["fcn8s.pt"]


def test_save_model_refuses_non_plain_metadata_and_leaves_nothing(tmp_path) -> None:
    model = _small("fcn32s")
    with pytest.raises(TypeError, match="optimizer"):
        save_model(tmp_path / "m.pt", model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="arch"):
        save_model(tmp_path / "m.pt", model, arch="fcn8s")
    assert list(tmp_path.iterdir()) == []


def test_load_model_refuses_pickled_objects(tmp_path) -> None:
    marker = tmp_path / "pickle-was-executed"
    evil = PlantedCode(marker)
    good = {"arch": "fcn32s", "num_classes": 21, "width": SMALL, "normalization": "imagenet"}
    for name, save in [
        ("torch.pt", lambda p: torch.save({**good, "state_dict": {}, "x": evil}, p)),
        ("plain.pkl", lambda p: p.write_bytes(pickle.dumps({"state_dict": evil}, protocol=2))),
    ]:
        path = tmp_path / name
        save(path)
        with pytest.raises(ModelFileError, match=f"{path}.*refused"):
            load_model(path)
    assert not marker.exists()  # refused, never run


def test_load_model_rejects_foreign_and_mismatched_files(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(ModelFileError, match=str(text)):
        load_model(text)
    partial = tmp_path / "partial.pt"
    torch.save({"arch": "fcn8s"}, partial)
    with pytest.raises(ModelFileError, match="missing"):
        load_model(partial)
    # weights of one width under another width's header
    wrong = tmp_path / "wrong.pt"
    sd = build_model("fcn32s", width=SMALL).state_dict()
    torch.save(
        {
            "arch": "fcn32s",
            "num_classes": 21,
            "width": 0.125,
            "normalization": "imagenet",
            "state_dict": sd,
        },
        wrong,
    )
    with pytest.raises(ModelFileError, match=r"wrong.pt: weights do not fit fcn32s"):
        load_model(wrong)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_model(tmp_path / "absent.pt")
