"""The sample's stand-in for ImageNet: a trained mini VGG16 classifier and its surgery into FCN-32s."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.classes import NUM_CLASSES
from pipeline.data.transforms import normalize
from pipeline.models import build_model
from pipeline.models.surgery import load_vgg16_backbone
from pipeline.training.pretrain import (
    CROP_SIZE,
    classification_set,
    fold_batchnorm,
    pretrain_vgg16,
    vgg16_bn_classifier,
    vgg16_classifier,
)

WIDTH = 1 / 16
FP32_EPS = torch.finfo(torch.float32).eps
# a short pretraining: few crops and epochs, enough to learn, cheap enough for the suite. With 8
# crops per class (20 s; 16: 36 s) the loss falls 4.44 -> 1.94 and fc8 read as a convolution
# agrees with the classifier on 74% of the unseen crops, 29% right (chance 4.8%); seed 0,
# one thread, 2-core AVX-512 machine
SHORT_RUN = {
    "width": WIDTH,
    "seed": 3,
    "train_per_class": 8,
    "val_per_class": 4,
    "epochs": 5,
    "batch_size": 16,
    "lr": 0.002,
    "progress": False,
}


def fp32_dot_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Worst-case error of an fp32 dot product of n terms: gamma_n * sum |w_i x_i|.

    gamma_n = n u / (1 - n u), u the unit roundoff (Higham, Accuracy and Stability of Numerical
    Algorithms, eq. 3.5). w: [out, n] float64, x: [n] float64; returns [out].
    """
    n = w.shape[1]
    u = FP32_EPS / 2
    gamma = n * u / (1 - n * u)
    return gamma * (w.abs() @ x.abs())


@pytest.fixture(scope="module")
def trained_classifier() -> tuple[dict[str, torch.Tensor], dict]:
    """A short pretraining run: few crops, enough to classify well above chance."""
    torch.manual_seed(0)
    return pretrain_vgg16(**SHORT_RUN)


def test_state_dict_has_torchvision_vgg16_layout() -> None:
    ours = vgg16_classifier(WIDTH).state_dict()
    ref = torchvision.models.vgg16(weights=None, num_classes=NUM_CLASSES).state_dict()
    assert list(ours) == list(ref)
    for k in ours:  # same rank, every axis scaled by the width (inputs: 3 channels stay 3)
        assert ours[k].dim() == ref[k].dim(), k
    assert ours["classifier.0.weight"].shape == (256, 32 * 7 * 7)
    assert ours["classifier.6.weight"].shape == (NUM_CLASSES, 256)


def test_fold_batchnorm_equals_the_bn_network() -> None:
    torch.manual_seed(0)
    bn_net = vgg16_bn_classifier(WIDTH, dropout=0.0)
    for m in bn_net.modules():  # non-trivial statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    bn_net.eval()
    plain = vgg16_classifier(WIDTH, dropout=0.0).eval()
    plain.load_state_dict(fold_batchnorm(bn_net))
    x = torch.randn(2, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = bn_net(x), plain(x)
    # 13 convs and 3 Linear layers re-associated in fp32: relative error a few 1e-6 per layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_classification_set_is_the_same_for_any_worker_count() -> None:
    a_x, a_y = classification_set(5, 1, start=7, size=64, workers=0)
    b_x, b_y = classification_set(5, 1, start=7, size=64, workers=2)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert a_x.dtype == torch.uint8 and a_x.shape == (NUM_CLASSES, 3, 64, 64)
    assert sorted(a_y.tolist()) == list(range(NUM_CLASSES))  # every class once


@pytest.mark.slow  # the module's pretraining run
def test_pretraining_learns_and_is_deterministic(trained_classifier) -> None:
    state, report = trained_classifier
    chance = 1 / NUM_CLASSES
    assert report["chance_top1"] == pytest.approx(chance, abs=1e-4)
    # a short run: it must learn (the loss falls well below its start, which is ln 21 = 3.04
    # for an untrained net), not reach an ImageNet-like accuracy
    assert report["train_loss_last_epoch"] <= 0.9 * report["train_loss_first_epoch"], report
    # same seed, same weights: two runs of a smaller pretraining (two epochs, so the second
    # epoch's order is drawn too, of 2 crops per class; a rerun of SHORT_RUN tests nothing more)
    tiny = {**SHORT_RUN, "train_per_class": 2, "val_per_class": 1, "epochs": 2}
    first, _ = pretrain_vgg16(**tiny)
    again, _ = pretrain_vgg16(**tiny)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], state[k]) for k in first)  # not a cached result


@pytest.mark.slow  # the module's pretraining run
def test_convolutionalized_fc7_equals_the_linear_fc7_of_the_trained_classifier(
    trained_classifier,
) -> None:
    """The paper's surgery on trained weights: fc6/fc7 as 7x7 and 1x1 convolutions."""
    state, _ = trained_classifier
    clf = vgg16_classifier(WIDTH, dropout=0.0).eval()
    clf.load_state_dict(state)
    fcn = build_model("fcn32s", NUM_CLASSES, WIDTH).eval()
    load_vgg16_backbone(fcn, state)
    crops, _ = classification_set(11, 1, size=CROP_SIZE)
    with torch.no_grad():
        pool5 = clf.features(normalize(crops[:4]))  # [4, C, 7, 7] at 224 x 224
        assert pool5.shape[-2:] == (7, 7)
        fc6_lin = F.relu(clf.classifier[0](pool5.flatten(1)))
        fc7_lin = F.relu(clf.classifier[3](fc6_lin))
        fc6_conv = F.relu(fcn.fc6(pool5))  # [4, fc, 1, 1]
        fc7_conv = F.relu(fcn.fc7(fc6_conv)).flatten(1)
        # float64 reference and the fp32 rounding bound of each dot product
        w6 = state["classifier.0.weight"].double()
        w7 = state["classifier.3.weight"].double()
        for i in range(len(pool5)):
            x = pool5[i].flatten().double()
            h6 = F.relu(w6 @ x + state["classifier.0.bias"].double())
            h7 = F.relu(w7 @ h6 + state["classifier.3.bias"].double())
            # fc6's error propagates through fc7 (|W7| times it) plus fc7's own rounding
            bound = fp32_dot_bound(w7, h6) + w7.abs() @ fp32_dot_bound(w6, x) + 1e-30
            for got in (fc7_lin[i], fc7_conv[i]):
                assert bool(((got.double() - h7).abs() <= bound).all())
        assert (fc7_conv - fc7_lin).abs().max() <= 2 * bound.max()


@pytest.mark.slow  # the module's pretraining run
def test_fc8_as_a_convolution_labels_the_object_before_any_segmentation_training(
    trained_classifier,
) -> None:
    """Classification to segmentation (the paper's section 3.1): the FCN-32s built from the
    classifier, with fc8 as its score layer, labels the pixel at the object's centre."""
    state, report = trained_classifier
    fcn = build_model("fcn32s", NUM_CLASSES, WIDTH).eval()
    load_vgg16_backbone(fcn, state)
    with torch.no_grad():
        fcn.score_fr.weight.copy_(state["classifier.6.weight"][:, :, None, None])
        fcn.score_fr.bias.copy_(state["classifier.6.bias"])
        crops, labels = classification_set(21, 4, size=CROP_SIZE)  # unseen crops
        keep = labels > 0  # crops with an object; it sits near the centre
        scores = fcn(normalize(crops[keep]))  # [N, 21, 224, 224]
    c = CROP_SIZE // 2
    pred = scores[:, :, c, c].argmax(1)
    clf = vgg16_classifier(WIDTH, dropout=0.0).eval()
    clf.load_state_dict(state)
    with torch.no_grad():
        clf_pred = clf(normalize(crops[keep])).argmax(1)
    # the same classifier, read at the centre of the score map: it mostly agrees with itself
    # (not exactly: conv1_1 pads 100 and the pools round up, so the windows shift a little)
    agreement = float((pred == clf_pred).float().mean())
    assert agreement >= 0.5, (agreement, report)
    # and labels the object better than chance before any segmentation training
    accuracy = float((pred == labels[keep]).float().mean())
    assert accuracy > 1 / NUM_CLASSES, (accuracy, report)
