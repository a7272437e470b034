"""Importing the released Caffe FCN weights (pipeline.models.caffe_import), checked against Caffe's nets.

The .caffemodel files here are written by the test itself (random weights under the releases'
layer names and shapes, at width 1/16 to stay fast) in Caffe's real byte format; the reference
forward is written from the Caffe net definitions (voc-fcn{32,16,8}s/net.py and
voc-fcn8s-atonce/net.py of the FCN repository): BGR 0..255 minus the mean, conv1_1 pad 100,
ceil-mode pools, Crop offsets 19 / 5, 27 / 5, 9, 31, no dropout at test time; at once, Scale
layers multiply pool4 by 0.01 and pool3 by 0.0001 (per channel) before the skip scores.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.transforms import normalize
from pipeline.inference.predict import predict_labels
from pipeline.models import NET_CLASSES, FCN8sAtOnce, load_model, save_model
from pipeline.models.caffe_import import ClassCountError, fcn_from_caffe, import_caffemodel
from pipeline.models.caffe_proto import read_caffemodel, write_caffemodel
from pipeline.models.fcn import CAFFE_MEAN_BGR, CaffeInput, build_model
from tests.helpers import (
    assert_matches_caffe,
    caffe_channels,
    proto_field,
    proto_varint,
    random_images,
)

SMALL = 1 / 16
IMAGE_HW = (37, 53)  # odd sizes: every crop offset and ceil-mode pool is exercised
C = 21
BLOCKS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))  # VGG16: (block, convs in it)
CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
CAFFE_CROPS = {  # the Crop layers' offsets in the FCN repository's prototxts
    "fcn32s": {"score": 19},
    "fcn16s": {"score_pool4c": 5, "score": 27},
    "fcn8s": {"score_pool4c": 5, "score_pool3c": 9, "score": 31},
    "fcn8s_atonce": {"score_pool4c": 5, "score_pool3c": 9, "score": 31},
}
# voc-fcn8s-atonce/net.py: L.Scale(pool, filler=dict(type='constant', value=...), lr_mult 0)
ATONCE_FILLERS = {"scale_pool4": 0.01, "scale_pool3": 0.0001}


def caffe_blobs(
    name: str, seed: int = 0, width: float = SMALL, scale_blobs: bool = True
) -> dict[str, list[np.ndarray]]:
    """Random blobs with the releases' layer names and shapes (Caffe's layouts).

    "fcn8s_atonce": FCN-8s's, plus the Scale layers `scale_pool4`/`scale_pool3`, holding their
    constant per channel (or, `scale_blobs=False`, listed without a blob), and skip score
    weights 1/scale larger, as at-once training makes them, so that the skips weigh in the
    logits (unscaled, they would vanish next to score_fr and a wrong scale would not show).
    """
    rng = np.random.default_rng(seed)

    def conv(out: int, inp: int, k: int) -> list[np.ndarray]:
        w = rng.normal(0, math.sqrt(2 / (inp * k * k)), (out, inp, k, k))
        return [w.astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)]

    def deconv(k: int) -> list[np.ndarray]:  # [in, out, kh, kw], no bias; not bilinear
        return [rng.normal(0, 0.5, (C, C, k, k)).astype(np.float32)]

    blobs: dict[str, list[np.ndarray]] = {"data": []}
    in_c = 3
    for block, n in BLOCKS:
        for i in range(1, n + 1):
            blobs[f"conv{block}_{i}"] = conv(caffe_channels(CHANNELS[block], width), in_c, 3)
            blobs[f"relu{block}_{i}"] = []
            in_c = caffe_channels(CHANNELS[block], width)
        blobs[f"pool{block}"] = []
    fc = caffe_channels(4096, width)
    blobs.update(fc6=conv(fc, in_c, 7), fc7=conv(fc, fc, 1), score_fr=conv(C, fc, 1))
    if name == "fcn32s":
        blobs["upscore"] = deconv(64)
    else:
        blobs.update(upscore2=deconv(4), score_pool4=conv(C, caffe_channels(512, width), 1))
        if name == "fcn16s":
            blobs["upscore16"] = deconv(32)
        else:
            blobs.update(
                upscore_pool4=deconv(4),
                score_pool3=conv(C, caffe_channels(256, width), 1),
                upscore8=deconv(16),
            )
    if name == "fcn8s_atonce":
        for pool, c in (("pool4", 512), ("pool3", 256)):
            value = ATONCE_FILLERS[f"scale_{pool}"]
            blobs[f"score_{pool}"][0] /= value
            scale = np.full(caffe_channels(c, width), value, np.float32)
            blobs[f"scale_{pool}"] = [scale] if scale_blobs else []
    blobs["score"] = []
    return blobs


def caffe_forward(name: str, blobs: dict[str, list[np.ndarray]], img: torch.Tensor) -> torch.Tensor:
    """The Caffe net, layer by layer, on uint8 RGB [N, 3, H, W]: logits [N, 21, H, W] float32."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    def conv(h: torch.Tensor, layer: str, pad: int = 0) -> torch.Tensor:
        w, b = blobs[layer]
        return F.conv2d(h, t(w), t(b), padding=pad)

    def deconv(h: torch.Tensor, layer: str, stride: int) -> torch.Tensor:
        return F.conv_transpose2d(h, t(blobs[layer][0]), stride=stride)

    def crop(h: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
        return h[:, :, offset : offset + like.shape[2], offset : offset + like.shape[3]]

    data = img.to(torch.float32).flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    h = data
    pools = {}
    for block, n in BLOCKS:
        for i in range(1, n + 1):
            h = F.relu(conv(h, f"conv{block}_{i}", pad=100 if (block, i) == (1, 1) else 1))
        h = pools[block] = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
    h = F.relu(conv(h, "fc6"))
    h = F.relu(conv(h, "fc7"))
    score_fr = conv(h, "score_fr")
    crops = CAFFE_CROPS[name]
    if name == "fcn32s":
        return crop(deconv(score_fr, "upscore", 32), data, crops["score"])
    if name == "fcn8s_atonce":  # Scale: one factor per channel (axis 1), the blob or the filler
        for block in (4, 3):
            layer = f"scale_pool{block}"
            s = t(blobs[layer][0]) if blobs[layer] else torch.tensor(ATONCE_FILLERS[layer])
            pools[block] = pools[block] * s.reshape(1, -1, 1, 1)
    up2 = deconv(score_fr, "upscore2", 2)
    fuse4 = up2 + crop(conv(pools[4], "score_pool4"), up2, crops["score_pool4c"])
    if name == "fcn16s":
        return crop(deconv(fuse4, "upscore16", 16), data, crops["score"])
    up4 = deconv(fuse4, "upscore_pool4", 2)
    fuse3 = up4 + crop(conv(pools[3], "score_pool3"), up4, crops["score_pool3c"])
    return crop(deconv(fuse3, "upscore8", 8), data, crops["score"])


# --- the byte format -------------------------------------------------------------------------


def test_reads_hand_encoded_bytes_with_caffe_proto_field_numbers(tmp_path) -> None:
    """Bytes spelled out from caffe.proto's field numbers, not from the module's schema: the
    current `layer` (100) with `shape`, and the V1 `layers` (2) with the legacy 4-D shape."""
    floats = struct.pack("<6f", *range(6))
    shape = proto_field(1, b"".join(proto_varint(d) for d in (2, 3)))  # BlobShape.dim, packed
    blob = proto_field(7, shape) + proto_field(5, floats)  # BlobProto.shape, .data (packed)
    layer = proto_field(1, b"conv") + proto_field(2, b"Convolution") + proto_field(7, blob)
    legacy = (
        proto_field(1, 1)
        + proto_field(2, 1)
        + proto_field(3, 2)
        + proto_field(4, 3)
        + proto_field(5, floats)
    )
    v1 = (
        proto_field(4, b"old") + proto_field(5, 4) + proto_field(6, legacy)
    )  # name, type CONVOLUTION, blobs
    path = tmp_path / "hand.caffemodel"
    path.write_bytes(proto_field(1, b"net") + proto_field(2, v1) + proto_field(100, layer))
    got = read_caffemodel(path)
    assert list(got) == ["conv", "old"]
    np.testing.assert_array_equal(got["conv"][0], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(got["old"][0], np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3))


def test_read_refuses_foreign_bytes(tmp_path) -> None:
    path = tmp_path / "x.caffemodel"
    path.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="x.caffemodel"):
        read_caffemodel(path)
    with pytest.raises(FileNotFoundError, match="absent"):
        read_caffemodel(tmp_path / "absent.caffemodel")


def test_truncated_file_names_itself_its_size_and_the_likely_cause(tmp_path) -> None:
    """Cut inside a layer (protobuf refuses it) or right after one (it parses: only the last
    layers are missing); either way the file is named, with its size, as looking truncated."""
    blobs = caffe_blobs("fcn8s")
    src = tmp_path / "full.caffemodel"
    write_caffemodel(src, blobs)
    full = src.read_bytes()
    cut = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    for n in (len(full) // 2, len(full) - 1, 3):
        cut.write_bytes(full[:n])
        with pytest.raises(ValueError, match=r"looks incomplete \(a truncated download\?\)") as e:
            read_caffemodel(cut)
        assert f"{cut} ({n} bytes)" in str(e.value)
        with pytest.raises(
            ValueError, match=rf"\({n} bytes, expected {len(full)}\): the file looks"
        ):
            read_caffemodel(cut, expected_size=len(full))  # refused before parsing
    for keep in (7, 20):  # ends with conv2_1; with relu4_1 (a layer without blobs)
        write_caffemodel(cut, dict(list(blobs.items())[:keep]))
        assert full.startswith(cut.read_bytes())
        last = [k for k in list(blobs)[:keep] if blobs[k]][-1]
        with pytest.raises(
            ValueError, match=rf"{cut} \(\d+ bytes\): .*missing.*'upscore8'.*after '{last}'"
        ) as e:
            import_caffemodel(cut, "fcn8s", tmp_path / "m.pt")
        assert "it looks truncated (an incomplete download?)" in str(e.value)
    assert not (tmp_path / "m.pt").exists()
    cut.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(0 bytes\): the file is empty: it looks incomplete"):
        read_caffemodel(cut)
    cut.write_bytes(b"<html><head><title>404 Not Found</title></head></html>\n")
    with pytest.raises(ValueError, match=r"not a Caffe NetParameter protobuf") as e:
        read_caffemodel(cut)
    assert "incomplete" not in str(e.value) and f"{cut} (" in str(e.value)


def _with_classes(blobs: dict[str, list[np.ndarray]], n: int) -> dict[str, list[np.ndarray]]:
    """The same net scoring `n` classes: score layers and upsamplings resized."""
    out = {}
    for k, v in blobs.items():
        if k.startswith("score") and v:
            out[k] = [np.zeros((n, *v[0].shape[1:]), np.float32), np.zeros(n, np.float32)]
        elif k.startswith("upscore"):
            out[k] = [np.zeros((n, n, *v[0].shape[2:]), np.float32)]
        else:
            out[k] = v
    return out


def test_other_class_count_is_refused_before_evaluate_and_stated_without(tmp_path, capsys) -> None:
    """The PASCAL-Context FCN-8s scores 60 classes: --evaluate (which scores VOC's 21) refuses
    it before building or writing anything; importing alone writes it and says so."""
    from pipeline.models.caffe_import import main

    src = tmp_path / "pascalcontext-fcn8s.caffemodel"
    write_caffemodel(src, _with_classes(caffe_blobs("fcn8s"), 60))
    with pytest.raises(ClassCountError, match=r"scores 60 classes .*not 21"):
        fcn_from_caffe("fcn8s", read_caffemodel(src), num_classes=21)
    out = tmp_path / "imported" / "fcn8s.pt"
    assert main([str(src), "--model", "fcn8s", "--out", str(out), "--evaluate"]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "60 classes" in err and "--evaluate scores the 21" in err
    assert not out.exists()
    assert main([str(src), "--model", "fcn8s", "--out", str(out)]) == 0
    assert "note: 60 classes, not the 21 PASCAL VOC classes" in capsys.readouterr().out
    assert load_model(out).num_classes == 60


# --- the import ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"])
def test_imported_net_computes_the_caffe_net(name: str, tmp_path) -> None:
    blobs = caffe_blobs(name)
    path = tmp_path / f"{name}.caffemodel"
    write_caffemodel(path, blobs)
    read = read_caffemodel(path)
    assert list(read) == list(blobs)
    for k in blobs:
        for a, b in zip(read[k], blobs[k], strict=True):
            np.testing.assert_array_equal(a, b)
    model = fcn_from_caffe(name, read)
    assert (model.arch, model.num_classes, model.width) == (name, 21, SMALL)
    assert isinstance(model.input_adapter, CaffeInput) and not model.training
    img = random_images(0, *IMAGE_HW)
    with torch.no_grad():
        assert_matches_caffe(model(normalize(img)), caffe_forward(name, blobs, img))


def test_v1_layers_file_imports_the_same(tmp_path) -> None:
    blobs = caffe_blobs("fcn16s", seed=1)
    new, old = tmp_path / "new.caffemodel", tmp_path / "v1.caffemodel"
    write_caffemodel(new, blobs)
    write_caffemodel(old, blobs, v1=True)
    read = read_caffemodel(old)
    assert read["fc7"][1].shape == (1, 1, 1, caffe_channels(4096, SMALL))  # a legacy 4-D bias
    a, b = fcn_from_caffe("fcn16s", read_caffemodel(new)), fcn_from_caffe("fcn16s", read)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_wrong_shape_missing_blob_or_layer_name_the_layer() -> None:
    fc = caffe_channels(4096, SMALL)
    blobs = caffe_blobs("fcn8s")
    blobs["score_fr"] = [np.zeros((C, fc + 1, 1, 1), np.float32), blobs["score_fr"][1]]
    with pytest.raises(
        ValueError, match=rf"'score_fr' weight .*\(21, {fc + 1}, 1, 1\).*\(21, {fc}"
    ):
        fcn_from_caffe("fcn8s", blobs)
    blobs = caffe_blobs("fcn8s")
    blobs["fc7"] = blobs["fc7"][:1]
    with pytest.raises(ValueError, match=r"'fc7' has 1 blobs .*expected 2 \(weight, bias\)"):
        fcn_from_caffe("fcn8s", blobs)
    blobs = caffe_blobs("fcn8s")
    del blobs["conv3_2"]
    with pytest.raises(
        ValueError, match=r"missing.*: 'conv3_2' \(expected blobs \[\(16, 16, 3, 3\), \(16,\)\]\)$"
    ):
        fcn_from_caffe("fcn8s", blobs)
    # FCN-16s weights are not FCN-8s: score_pool3 and upscore_pool4 are missing (and its
    # layers are FCN-8s's first ones, but upscore16 follows them: not a truncated file)
    with pytest.raises(ValueError, match="missing.*'upscore_pool4'.*; 'score_pool3'") as e:
        fcn_from_caffe("fcn8s", caffe_blobs("fcn16s"))
    assert "truncated" not in str(e.value)
    # ... and weights with no place in the model are not dropped silently
    blobs = caffe_blobs("fcn16s")
    blobs["score_pool3"] = caffe_blobs("fcn8s")["score_pool3"]
    with pytest.raises(ValueError, match=r"weights for layers \['score_pool3'\] that fcn16s lacks"):
        fcn_from_caffe("fcn16s", blobs)


# --- FCN-8s at-once ---------------------------------------------------------------------------


def test_atonce_imports_with_or_without_scale_blobs(tmp_path) -> None:
    img = random_images(4, *IMAGE_HW)
    ref = caffe_forward("fcn8s_atonce", caffe_blobs("fcn8s_atonce"), img)
    for scale_blobs in (True, False):
        blobs = caffe_blobs("fcn8s_atonce", scale_blobs=scale_blobs)
        path = tmp_path / f"atonce-{scale_blobs}.caffemodel"
        write_caffemodel(path, blobs)
        read = read_caffemodel(path)
        assert [len(read[k]) for k in ATONCE_FILLERS] == [int(scale_blobs)] * 2
        model = fcn_from_caffe("fcn8s_atonce", read)
        assert type(model) is FCN8sAtOnce and (model.num_classes, model.width) == (C, SMALL)
        assert not any("scale" in k for k in model.state_dict())
        with torch.no_grad():
            assert_matches_caffe(model(normalize(img)), ref)
    # a legacy V1 file stores the scales as (1, 1, 1, C): the same model
    v1 = tmp_path / "v1.caffemodel"
    write_caffemodel(v1, caffe_blobs("fcn8s_atonce"), v1=True)
    assert read_caffemodel(v1)["scale_pool3"][0].shape == (1, 1, 1, caffe_channels(256, SMALL))
    a, b = fcn_from_caffe("fcn8s_atonce", read_caffemodel(v1)), model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_atonce_reference_sees_the_scales() -> None:
    """Control: the comparison above fails for a net whose scales are 10% off."""
    blobs = caffe_blobs("fcn8s_atonce")
    model = fcn_from_caffe("fcn8s_atonce", blobs)
    img = random_images(5, *IMAGE_HW)
    with torch.no_grad():
        logits = model(normalize(img))
    for layer, value in ATONCE_FILLERS.items():
        off = {**blobs, layer: [np.full_like(blobs[layer][0], value * 1.1)]}
        with pytest.raises(AssertionError):
            assert_matches_caffe(logits, caffe_forward("fcn8s_atonce", off, img))


def test_atonce_scale_blobs_must_hold_the_constants() -> None:
    for layer, value in ATONCE_FILLERS.items():
        blobs = caffe_blobs("fcn8s_atonce")
        blobs[layer] = [np.full_like(blobs[layer][0], value * 10)]
        with pytest.raises(ValueError, match=rf"'{layer}' holds scales .*expected the constant"):
            fcn_from_caffe("fcn8s_atonce", blobs)
        blobs[layer][0][0] = value  # one channel right is not enough
        with pytest.raises(ValueError, match=rf"'{layer}'"):
            fcn_from_caffe("fcn8s_atonce", blobs)
        # float32 rounding is not an error: one ulp either side
        blobs[layer] = [np.full_like(blobs[layer][0], value)]
        blobs[layer][0][0] = np.nextafter(np.float32(value), np.float32(1))
        blobs[layer][0][1] = np.nextafter(np.float32(value), np.float32(0))
        fcn_from_caffe("fcn8s_atonce", blobs)
    blobs = caffe_blobs("fcn8s_atonce")
    blobs["scale_pool4"] = [
        np.full(caffe_channels(256, SMALL), 0.01, np.float32)
    ]  # pool3's channels
    with pytest.raises(
        ValueError,
        match=rf"'scale_pool4' scale blob has shape \({caffe_channels(256, SMALL)},\), expected \({caffe_channels(512, SMALL)},\)",
    ):
        fcn_from_caffe("fcn8s_atonce", blobs)
    blobs = caffe_blobs("fcn8s_atonce")
    blobs["scale_pool3"].append(np.zeros(caffe_channels(256, SMALL), np.float32))  # a bias term
    with pytest.raises(ValueError, match=r"'scale_pool3' has 2 blobs"):
        fcn_from_caffe("fcn8s_atonce", blobs)
    blobs = caffe_blobs("fcn8s_atonce")
    del blobs["scale_pool3"]
    with pytest.raises(ValueError, match=r"Scale layers missing .*\['scale_pool3'\]"):
        fcn_from_caffe("fcn8s_atonce", blobs)


def test_wrong_fcn8s_variant_names_the_model_to_use() -> None:
    for scale_blobs in (True, False):
        atonce = caffe_blobs("fcn8s_atonce", scale_blobs=scale_blobs)
        for name in ("fcn8s", "fcn16s", "fcn32s"):
            with pytest.raises(ValueError, match=r"at-once .*import it as 'fcn8s_atonce'"):
                fcn_from_caffe(name, atonce)
    with pytest.raises(ValueError, match=r"no scale_pool4 / scale_pool3.*import it as 'fcn8s'$"):
        fcn_from_caffe("fcn8s_atonce", caffe_blobs("fcn8s"))
    # a net other than FCN-8s is told what it lacks, as for fcn8s
    with pytest.raises(ValueError, match="missing.*'upscore_pool4'.*; 'score_pool3'"):
        fcn_from_caffe("fcn8s_atonce", caffe_blobs("fcn16s"))
    # the layer checks hold at once too
    blobs = caffe_blobs("fcn8s_atonce")
    blobs["score_pool3"] = blobs["score_pool3"][:1]
    with pytest.raises(ValueError, match=r"'score_pool3' has 1 blobs .*expected 2"):
        fcn_from_caffe("fcn8s_atonce", blobs)


# --- model files -----------------------------------------------------------------------------


def test_model_file_round_trip_keeps_the_normalisation(tmp_path) -> None:
    from pipeline.models.caffe_import import main

    blobs = caffe_blobs("fcn8s", seed=2)
    src, out = tmp_path / "fcn8s-heavy.caffemodel", tmp_path / "models" / "fcn8s.pt"
    write_caffemodel(src, blobs)
    assert main([str(src), "--model", "fcn8s", "--out", str(out)]) == 0
    raw = torch.load(out, weights_only=True)
    assert raw["normalization"] == {"kind": "caffe_bgr", "mean_bgr": list(CAFFE_MEAN_BGR)}
    assert raw["imported_from"] == src.name and len(raw["source_sha256"]) == 64
    assert not any(k.startswith("input_adapter") for k in raw["state_dict"])
    loaded = load_model(out)
    assert isinstance(loaded.input_adapter, CaffeInput) and loaded.normalization == "imagenet"
    img = random_images(3, *IMAGE_HW)
    ref = caffe_forward("fcn8s", blobs, img)
    with torch.no_grad():
        assert_matches_caffe(loaded(normalize(img)), ref)
    # predict (and evaluate, which calls it) feed the pipeline's input unchanged
    labels = predict_labels(loaded, img)
    assert (labels == ref.argmax(1)).float().mean() > 0.999
    # saving the loaded model again writes the same normalisation
    save_model(tmp_path / "again.pt", loaded)
    assert (
        torch.load(tmp_path / "again.pt", weights_only=True)["normalization"]
        == (raw["normalization"])
    )


def test_trained_model_files_are_unchanged(tmp_path) -> None:
    """A model without adapter writes exactly the bytes it wrote before the adapter existed."""
    import io

    model = build_model("fcn16s", width=SMALL)
    path = tmp_path / "fcn16s.pt"
    save_model(path, model, epoch=1)
    old = io.BytesIO()
    torch.save(
        {
            "arch": "fcn16s",
            "num_classes": 21,
            "width": SMALL,
            "normalization": "imagenet",
            "state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            "epoch": 1,
        },
        old,
    )
    assert path.read_bytes() == old.getvalue()
    assert load_model(path).input_adapter is None


def test_load_model_refuses_unknown_normalisation(tmp_path) -> None:
    from pipeline.models import ModelFileError

    model = build_model("fcn32s", width=SMALL)
    path = tmp_path / "m.pt"
    save_model(path, model)
    raw = torch.load(path, weights_only=True)
    for bad in ("caffe", {"kind": "caffe_bgr"}, {"kind": "caffe_bgr", "mean_bgr": ["a"]}):
        torch.save({**raw, "normalization": bad}, path)
        with pytest.raises(ModelFileError, match="m.pt: unknown input normalization"):
            load_model(path)


def test_cli_help_and_errors(tmp_path, capsys) -> None:
    from pipeline.config import ARCHITECTURES
    from pipeline.models.caffe_import import main

    assert sorted(ARCHITECTURES) == sorted(NET_CLASSES)  # --model's choices
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "fcn8s-atonce" in capsys.readouterr().out
    blobs = caffe_blobs("fcn8s_atonce", seed=6)
    src = tmp_path / "fcn8s-atonce-pascal.caffemodel"
    write_caffemodel(src, blobs)
    out = tmp_path / "m.pt"
    assert main([str(src), "--model", "fcn8s", "--out", str(out)]) == 1
    assert "import it as 'fcn8s_atonce'" in capsys.readouterr().err and not out.exists()
    # the right name imports it; the file records the arch and rebuilds the at-once net
    assert main([str(src), "--model", "fcn8s_atonce", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["arch"] == "fcn8s_atonce"
    loaded = load_model(out)
    assert type(loaded) is FCN8sAtOnce and isinstance(loaded.input_adapter, CaffeInput)
    img = random_images(7, *IMAGE_HW)
    with torch.no_grad():
        assert_matches_caffe(loaded(normalize(img)), caffe_forward("fcn8s_atonce", blobs, img))
    heavy = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    write_caffemodel(heavy, caffe_blobs("fcn8s"))
    assert main([str(heavy), "--model", "fcn8s_atonce", "--out", str(tmp_path / "h.pt")]) == 1
    assert "import it as 'fcn8s'" in capsys.readouterr().err
    assert not (tmp_path / "h.pt").exists()


def test_one_command_imports_and_scores_through_the_evaluate_stage(
    tmp_path, monkeypatch, generated_voc, repo_root
) -> None:
    """`fcn-import-caffe X --model fcn8s --evaluate`: the imported net is scored by the evaluate
    stage's code on the active profile's val shards; the metrics are its predictions'."""
    import json
    import tarfile

    from pipeline.data.preprocess import preprocess_voc
    from pipeline.models.caffe_import import main

    tar = tmp_path / "voc.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(generated_voc.parent, "VOCdevkit")
    preprocess_voc(tar, tmp_path / "data" / "preprocessed", max_size=96, progress=False)
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    src = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    write_caffemodel(src, caffe_blobs("fcn8s", seed=4))
    monkeypatch.chdir(tmp_path)
    assert main([str(src), "--model", "fcn8s", "--evaluate"]) == 0
    metrics = json.loads((tmp_path / "eval/imported/metrics/fcn8s.json").read_text())
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert "FCN-8s" in (tmp_path / "eval/imported/reports/summary.md").read_text()
    assert main([str(src), "--model", "fcn8s", "--out", "x.pt", "--evaluate"]) == 2
