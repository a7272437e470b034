"""pipeline.models.heads: the 1-layer baseline and torchvision's FCN-ResNet50 / DeepLabV3-ResNet50,
trained a few steps on generated data, at odd input sizes, and the backbone loaded by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.models.heads import (
    HEADS,
    RESNET50_CLASSIFIER,
    BackboneMismatchError,
    build_head,
    load_resnet50_backbone,
)


def test_the_one_layer_baseline_has_exactly_588_parameters():
    model = build_head("baseline_1layer")
    assert sum(p.numel() for p in model.parameters()) == 3 * 3 * 3 * 21 + 21 == 588


@pytest.mark.parametrize("name", list(HEADS))
def test_each_head_trains_a_few_steps_and_keeps_odd_input_sizes(name):
    torch.manual_seed(0)
    model = build_head(name)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 37, 53, generator=gen)
    # two classes in blocks, a void border: labels a net can fit from the image it sees
    labels = torch.zeros(2, 37, 53, dtype=torch.long)
    labels[:, 8:30, 10:40] = 15
    labels[:, :, :2] = IGNORE_INDEX
    images[:, 0] += (labels == 15).float() * 2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(4):
        logits = model(images)
        assert logits.shape == (2, NUM_CLASSES, 37, 53) and logits.dtype == torch.float32
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        for size in ((1, 1), (33, 33), (65, 31)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, NUM_CLASSES, *size), (name, size)


def resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict (resnet50-0676ba61.pth's keys), random weights."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).state_dict()


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_the_backbone_loads_by_name_with_every_tensor_accounted_for(name):
    state = resnet50_state(seed=3)
    head = build_head(name)
    left_out = load_resnet50_backbone(head, state)
    assert left_out == sorted(RESNET50_CLASSIFIER)
    own = head.backbone.state_dict()
    assert set(own) == set(state) - set(RESNET50_CLASSIFIER)
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_a_partial_or_foreign_backbone_is_refused_naming_the_keys():
    head = build_head("fcn_resnet50")
    before = {k: v.clone() for k, v in head.backbone.state_dict().items()}
    state = resnet50_state(seed=4)
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.2.")}
    with pytest.raises(
        BackboneMismatchError, match=r"r50\.pth: .*not in the file \d+: layer4\.2\."
    ):
        load_resnet50_backbone(head, partial, source="r50.pth")
    foreign = {**state, "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(BackboneMismatchError, match="does not have 1: layer5.0.conv1.weight"):
        load_resnet50_backbone(head, foreign)
    reshaped = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(BackboneMismatchError, match="another shape 1: conv1.weight"):
        load_resnet50_backbone(head, reshaped)
    after = head.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_an_unknown_head_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="one of baseline_1layer, fcn_resnet50"):
        build_head("unet")
