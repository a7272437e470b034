"""The Caffe model zoo's VGG16 as the FCN backbone (pipeline.models.caffe_vgg16), checked
against the Caffe net.

The .caffemodel files are written by this test's own protobuf encoder, from the field numbers
of BVLC Caffe's caffe.proto (not with the module's schema or `write_caffemodel`), in both the
V1 `layers` format of the released file and the current `layer` format. Their layers are those
of VGG_ILSVRC_16_layers_deploy.prototxt (gist ksimonyan/211839e770f7b538e2d8), names and order
included (ReLU, Pooling, Dropout and Softmax layers carry no blobs), with random weights at
width 1/16 (every channel count / 16 but fc8's 1000 ImageNet classes); one test checks the
full-size shapes without writing the 528 MB file.

The reference forward is written from the prototxt: BGR 0..255 minus the mean pixel, 3x3
convolutions with pad 1, ReLU, 2x2 stride-2 max pools, InnerProduct fc6 on pool5 flattened
(C, H, W), fc7, no dropout at test time.

What "the FCN's fc7 equals the Caffe VGG16's fc7" means: the FCN computes fc6/fc7 as
convolutions (fc6: the InnerProduct weight reshaped to 7x7 over C, H, W), so on a 224x224
input whose pool5 is 7x7 it has one fc7 position, and that position is the classifier's fc7
exactly when its convolutions see what the classifier's see: conv1_1 padded by 1, as in the
prototxt. The FCN's own conv1_1 pads by 100 (so that any input yields a score map covering it);
then no fc7 position is a classifier on a window (the zero border is 100 wide, inner layers see
activations where the classifier sees padding, pools pair different pixels), and what it
computes is Caffe's VGG16 made fully convolutional as the release did it (voc-fcn32s/net.py:
conv1_1 pad 100, pools rounding up, fc6/fc7 as 7x7/1x1 convolutions), at every position. The
test checks both: the classifier geometry (conv1_1 set to pad 1) and the FCN's own.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.transforms import normalize
from pipeline.models.caffe_vgg16 import (
    CAFFE_VGG16_FORMAT,
    caffe_vgg16_layers,
    caffe_vgg16_shapes,
    convert_caffe_vgg16,
    load_vgg16_weights,
    save_caffe_vgg16,
    vgg16_state_dict_from_caffe,
)
from pipeline.models.fcn import CAFFE_MEAN_BGR, CaffeInput, build_model
from pipeline.models.surgery import load_vgg16_backbone, random_vgg16_state_dict
from tests.helpers import (
    DEPLOY,
    assert_matches_caffe,
    caffe_channels,
    caffe_vgg16_blobs,
    deploy_shapes,
    encode_caffe_vgg16,
    random_images,
)

SMALL = 1 / 16  # the width of the test files (fc8 keeps 1,000 outputs)

SMALL = 1 / 16


def write(tmp_path, blobs, v1: bool = True, name: str = "VGG_ILSVRC_16_layers.caffemodel"):
    path = tmp_path / name
    path.write_bytes(encode_caffe_vgg16(blobs, v1))
    return path


# --- the Caffe VGG16, from the prototxt -----------------------------------------------------


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def caffe_features(blobs, img: torch.Tensor, mean_bgr, conv1_pad: int = 1) -> torch.Tensor:
    """pool5 of uint8 RGB [N, 3, H, W]: BGR minus the mean, 3x3 convs (conv1_1 padded by
    `conv1_pad`, the others by 1), ReLU, 2x2 stride-2 max pools rounding up (Caffe's Pooling)."""
    h = img.to(torch.float32).flip(1) - torch.tensor(mean_bgr).view(1, 3, 1, 1)
    for name, kind, _ in DEPLOY[: [n for n, _, _ in DEPLOY].index("fc6")]:
        if kind == "Convolution":
            w, b = blobs[name]
            h = F.relu(F.conv2d(h, _t(w), _t(b), padding=conv1_pad if name == "conv1_1" else 1))
        elif kind == "Pooling":
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
    return h


def caffe_fc7(blobs, img: torch.Tensor, mean_bgr) -> torch.Tensor:
    """The classifier's fc7 [N, 4096*w] on a 224x224 batch: InnerProduct on pool5 flattened
    from axis 1 (C, H, W, row-major), ReLU, fc7, ReLU."""
    flat = caffe_features(blobs, img, mean_bgr).flatten(1)
    fc6 = F.relu(F.linear(flat, _t(blobs["fc6"][0]), _t(blobs["fc6"][1])))
    return F.relu(F.linear(fc6, _t(blobs["fc7"][0]), _t(blobs["fc7"][1])))


def caffe_fcn_fc7(blobs, img: torch.Tensor, mean_bgr) -> torch.Tensor:
    """fc7 map of the VGG16 made fully convolutional as voc-fcn32s/net.py does: conv1_1 pad
    100, fc6's [out, C*7*7] weight read as [out, C, 7, 7] (the flatten's C, H, W order), fc7
    as a 1x1 convolution."""
    h = caffe_features(blobs, img, mean_bgr, conv1_pad=100)
    w6, w7 = blobs["fc6"][0], blobs["fc7"][0]
    h = F.relu(F.conv2d(h, _t(w6.reshape(w6.shape[0], h.shape[1], 7, 7)), _t(blobs["fc6"][1])))
    return F.relu(F.conv2d(h, _t(w7.reshape(*w7.shape, 1, 1)), _t(blobs["fc7"][1])))


def fcn_fc7(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """The FCN's fc7 map (relu7's output) on the pipeline's input, from its own forward."""
    got = []
    handle = model.relu7.register_forward_hook(lambda m, i, out: got.append(out.clone()))
    try:
        with torch.no_grad():
            model(normalize(img))
    finally:
        handle.remove()
    return got[0]


def _backbone(sd: dict[str, torch.Tensor], spec) -> torch.nn.Module:
    model = build_model("fcn32s", width=SMALL)
    load_vgg16_backbone(model, sd, source="converted")
    model.input_adapter = CaffeInput.from_spec(spec)
    return model.eval()


# --- shapes ------------------------------------------------------------------------------------


def test_full_size_shapes_are_the_deploy_prototxt_and_torchvision() -> None:
    """Without a 528 MB file: the shapes checked at width 1 are the prototxt's, and under the
    keys they get, torchvision's VGG16 (built on the meta device: no weights made)."""
    tv = pytest.importorskip("torchvision")
    shapes = caffe_vgg16_shapes(1.0)
    assert shapes == deploy_shapes(1.0)
    assert shapes["fc6"] == ((4096, 25088), (4096,)) and shapes["fc8"] == ((1000, 4096), (1000,))
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in tv.models.vgg16().state_dict().items()}
    mine = {
        f"{module}.{kind}": shape
        for layer, module in caffe_vgg16_layers().items()
        for kind, shape in zip(("weight", "bias"), shapes[layer], strict=True)
    }
    assert mine == ref
    assert list(caffe_vgg16_layers()) == [n for n, _, _ in DEPLOY if n in shapes]


# --- the conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("v1", [True, False], ids=["v1-layers", "v2-layer"])
def test_converted_backbone_computes_the_caffe_classifier_fc7(tmp_path, v1: bool) -> None:
    blobs = caffe_vgg16_blobs(seed=1)
    out = tmp_path / "vgg16_caffe.pth"
    convert_caffe_vgg16(write(tmp_path, blobs, v1=v1), out)
    sd, spec = load_vgg16_weights(out)
    assert spec == CaffeInput().spec() and all(v.dtype == torch.float32 for v in sd.values())
    model = _backbone(sd, spec)
    model.features[0].padding = (1, 1)  # the classifier's geometry (see the module docstring)
    img = random_images(seed=2, h=224, w=224)
    got = fcn_fc7(model, img)
    assert got.shape[2:] == (1, 1)
    assert_matches_caffe(got.flatten(1), caffe_fc7(blobs, img, spec["mean_bgr"]))


def test_fcn_fc7_is_the_fully_convolutional_caffe_vgg16(tmp_path) -> None:
    """conv1_1 pad 100 as the FCN has it: every position of the fc7 map (3x4 here, through
    pools that round up) is Caffe's VGG16 made fully convolutional as the release made it."""
    blobs = caffe_vgg16_blobs(seed=3)
    sd = vgg16_state_dict_from_caffe(write(tmp_path, blobs))
    model = _backbone(sd, CaffeInput().spec())
    img = random_images(seed=4, h=70, w=100)
    got = fcn_fc7(model, img)
    assert got.shape[2:] == (3, 4)
    assert_matches_caffe(got, caffe_fcn_fc7(blobs, img, CAFFE_MEAN_BGR))


def test_the_comparison_sees_channel_and_flatten_order(tmp_path) -> None:
    """Control: RGB instead of BGR in conv1_1, or fc6 read as (H, W, C), fails the comparison."""
    blobs = caffe_vgg16_blobs(seed=5)
    sd = vgg16_state_dict_from_caffe(write(tmp_path, blobs))
    img = random_images(seed=6, h=224, w=224)
    ref = caffe_fc7(blobs, img, CAFFE_MEAN_BGR)
    w6 = sd["classifier.0.weight"]
    c = sd["features.28.weight"].shape[0]
    for bad in (
        {"features.0.weight": sd["features.0.weight"].flip(1)},
        {"classifier.0.weight": w6.reshape(-1, c, 7, 7).permute(0, 2, 3, 1).reshape(w6.shape)},
    ):
        model = _backbone({**sd, **bad}, CaffeInput().spec())
        model.features[0].padding = (1, 1)
        with pytest.raises(AssertionError):
            assert_matches_caffe(fcn_fc7(model, img).flatten(1), ref)


def test_v1_layers_file_converts_as_the_v2_file(tmp_path) -> None:
    from pipeline.models.caffe_proto import read_caffemodel

    blobs = caffe_vgg16_blobs(seed=7)
    v1 = write(tmp_path, blobs, v1=True, name="v1.caffemodel")
    v2 = write(tmp_path, blobs, v1=False, name="v2.caffemodel")
    fc = caffe_channels(4096, SMALL)
    assert read_caffemodel(v1)["fc6"][0].shape == (
        1,
        1,
        fc,
        caffe_channels(512, SMALL) * 49,
    )  # legacy 4-D
    assert read_caffemodel(v1)["fc6"][1].shape == (1, 1, 1, fc)
    a, b = vgg16_state_dict_from_caffe(v1), vgg16_state_dict_from_caffe(v2)
    assert list(a) == list(b) == list(random_vgg16_state_dict(SMALL, 0))
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].is_contiguous()


# --- errors ---------------------------------------------------------------------------------


def _refused(path, match: str, **kw) -> str:
    with pytest.raises(ValueError, match=match) as e:
        vgg16_state_dict_from_caffe(path, **kw)
    assert str(path) in str(e.value)  # names the file
    return str(e.value)


def test_wrong_names_and_shapes_are_refused_naming_the_layer(tmp_path) -> None:
    fc, c5 = caffe_channels(4096, SMALL), caffe_channels(512, SMALL)
    blobs = caffe_vgg16_blobs()
    blobs["conv3_2_renamed"] = blobs.pop("conv3_2")
    msg = _refused(write(tmp_path, blobs), r"layers missing from the caffemodel: \['conv3_2'\]")
    assert "truncated" not in msg
    blobs = {**caffe_vgg16_blobs(), "conv3_4": caffe_vgg16_blobs()["conv3_3"]}  # VGG19 has it
    _refused(write(tmp_path, blobs), r"weights for layers \['conv3_4'\] that VGG16 lacks")
    blobs = caffe_vgg16_blobs()
    blobs["fc6"][0] = np.zeros((fc, c5 * 49 + 1), np.float32)
    _refused(
        write(tmp_path, blobs),
        rf"'fc6' weight blob has shape \(1, 1, {fc}, {c5 * 49 + 1}\), expected \({fc}, {c5 * 49}\)",
    )
    blobs = caffe_vgg16_blobs()
    blobs["conv4_1"][0] = np.zeros((c5, caffe_channels(256, SMALL), 5, 5), np.float32)
    c3 = caffe_channels(256, SMALL)
    _refused(
        write(tmp_path, blobs, v1=False), rf"'conv4_1' weight blob has shape \({c5}, {c3}, 5, 5\)"
    )
    blobs = caffe_vgg16_blobs()
    blobs["fc7"] = blobs["fc7"][:1]
    _refused(write(tmp_path, blobs), r"'fc7' has 1 blobs .*expected 2 \(weight, bias\)")
    blobs = caffe_vgg16_blobs()  # an FCN release is not VGG16
    del blobs["fc8"], blobs["prob"]
    blobs["score_fr"] = [np.zeros((21, fc, 1, 1), np.float32), np.zeros(21, np.float32)]
    _refused(write(tmp_path, blobs), r"\['fc8'\].*an FCN release\? Import those with fcn-import")


def test_truncated_or_foreign_files_are_refused_as_such(tmp_path) -> None:
    full = encode_caffe_vgg16(caffe_vgg16_blobs(), v1=True)
    path = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    path.write_bytes(full[: len(full) * 2 // 3])  # cut inside a layer
    msg = _refused(path, r"looks incomplete \(a truncated download\?\)")
    assert f"({len(full) * 2 // 3} bytes)" in msg
    msg = _refused(path, r"looks incomplete", expected_size=len(full))
    assert f"({len(full) * 2 // 3} bytes, expected {len(full)})" in msg
    # cut right after a complete layer: it parses, and only the last layers are missing
    kept = dict(list(caffe_vgg16_blobs().items())[:20])  # conv1_1 ... conv4_2
    path.write_bytes(encode_caffe_vgg16(kept, v1=True))
    assert full.startswith(path.read_bytes())
    msg = _refused(path, r"missing.*'conv4_3'.*'fc8'.*nothing after 'conv4_2': it looks truncated")
    assert f"({path.stat().st_size} bytes)" in msg
    path.write_bytes(b"<html><head><title>301 Moved Permanently</title></head></html>\n")
    _refused(path, "not a Caffe NetParameter protobuf")
    path.write_bytes(b"")
    _refused(path, r"empty: it looks incomplete")


# --- the file that records the input convention ---------------------------------------------


def test_the_saved_file_records_the_convention_and_the_loader_tells_them_apart(tmp_path) -> None:
    src = write(tmp_path, caffe_vgg16_blobs(seed=8))
    out = tmp_path / "vgg16" / "vgg16_caffe.pth"
    sd = convert_caffe_vgg16(src, out)
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == CAFFE_VGG16_FORMAT and raw["normalization"] == CaffeInput().spec()
    assert raw["source"] == src.name
    assert raw["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    loaded, spec = load_vgg16_weights(out)
    assert spec == {"kind": "caffe_bgr", "mean_bgr": list(CAFFE_MEAN_BGR)}
    assert all(torch.equal(loaded[k], sd[k]) for k in sd) and list(loaded) == list(sd)
    # a reader unaware of the convention cannot take the converted file for a torchvision one
    with pytest.raises(ValueError, match="missing key 'features.0.weight'"):
        load_vgg16_backbone(build_model("fcn32s", width=SMALL), raw)
    plain = tmp_path / "vgg16.pth"
    torch.save(random_vgg16_state_dict(SMALL, seed=0), plain)
    assert load_vgg16_weights(plain)[1] == "imagenet"
    assert sorted(p.name for p in out.parent.iterdir()) == ["vgg16_caffe.pth"]  # no temporaries


def test_loader_and_converter_refuse_what_they_cannot_vouch_for(tmp_path) -> None:
    src = write(tmp_path, caffe_vgg16_blobs(seed=9))
    out = tmp_path / "vgg16_caffe.pth"
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, expected 0{64}"):
        convert_caffe_vgg16(src, out, expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="looks incomplete"):
        convert_caffe_vgg16(src, out, expected_size=src.stat().st_size + 1)
    assert not out.exists()
    sd = vgg16_state_dict_from_caffe(src)
    for payload, match in (
        ({"format": "other/v9", "state_dict": sd}, "unknown weights format 'other/v9'"),
        ({"format": CAFFE_VGG16_FORMAT, "normalization": "caffe", "state_dict": sd}, "normaliz"),
        ({"format": CAFFE_VGG16_FORMAT, "normalization": CaffeInput().spec()}, "state dict"),
        ([1, 2], "neither a torchvision VGG16 state dict"),
    ):
        torch.save(payload, out)
        with pytest.raises(ValueError, match=match):
            load_vgg16_weights(out)
    out.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a torch weights file"):
        load_vgg16_weights(out)
    with pytest.raises(FileNotFoundError):
        load_vgg16_weights(tmp_path / "absent.pth")
    with pytest.raises(TypeError, match="floating-point"):
        save_caffe_vgg16(out, {"features.0.weight": torch.zeros(2, dtype=torch.int64)})


def test_training_starts_each_backbone_on_its_own_input(tmp_path) -> None:
    """The training stages' initial models: FCN-32s on the converted Caffe VGG16 gets the
    `CaffeInput` adapter (and its file would say so), FCN-16s started from that FCN-32s
    inherits it, and FCN-32s on a plain torchvision dict gets none: no backbone is fed the
    other's input."""
    from pipeline.models.fcn import NORMALIZATION, save_model
    from pipeline.training.start import build_initial_model

    converted = tmp_path / "vgg16.pth"
    convert_caffe_vgg16(write(tmp_path, caffe_vgg16_blobs(seed=11)), converted)
    plain = tmp_path / "torchvision.pth"  # the same tensors as a plain state dict
    torch.save(load_vgg16_weights(converted)[0], plain)
    kw = {"width": SMALL, "backbone_init": "vgg16", "seed": 0}

    fcn32, log = build_initial_model("fcn32s", vgg16_path=converted, init_from=None, **kw)
    assert isinstance(fcn32.input_adapter, CaffeInput), log
    assert fcn32.weights_normalization == CaffeInput().spec()
    save_model(tmp_path / "fcn32s.pt", fcn32)
    fcn16, _ = build_initial_model(
        "fcn16s", vgg16_path=None, init_from=tmp_path / "fcn32s.pt", **kw
    )
    assert fcn16.weights_normalization == CaffeInput().spec()
    tv, _ = build_initial_model("fcn32s", vgg16_path=plain, init_from=None, **kw)
    assert tv.input_adapter is None and tv.weights_normalization == NORMALIZATION
    # the same tensors: with the adapter fc7 is the Caffe net's on Caffe's input, without it
    # not (the score layers start at zero, so compare fc7, not the logits)
    img = random_images(0, 40, 48)
    ref = caffe_fcn_fc7(caffe_vgg16_blobs(seed=11), img, CAFFE_MEAN_BGR)
    assert_matches_caffe(fcn_fc7(fcn32.eval(), img), ref)
    assert not torch.allclose(fcn_fc7(tv.eval(), img), ref, rtol=0.1, atol=0.1)
