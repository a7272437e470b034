"""Classification pretraining: the sample profile's stand-in for ImageNet VGG16.

The paper starts FCN-32s from a VGG16 *classifier* trained on ImageNet (section 4.1,
"convolutionalize"): its conv layers already detect parts, its fc6/fc7 already classify a
224 x 224 window. The offline sample cannot download those weights, so it trains the same
network, width-reduced, on crops of its own appearance families (`pipeline.data.sample`), with
torchvision's exact module layout (`torchvision.models.VGG`: `features.N`, `avgpool`,
`classifier.0/3/6` Linear layers). The FCN-32s stage then performs the real surgery on it:
fc6/fc7 Linear -> convolution, score layer zero-initialised.

Classes: the class under the crop's centre, 0 = background (or a non-VOC distractor) there,
1..20 = the VOC classes, so `classifier.6` has 21 outputs (ImageNet's has 1000; FCN discards it either way).
Deterministic for a seed on one machine in fp32: crops are drawn from fixed streams, the
batch order from a seeded generator, and no DataLoader workers are involved.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.vgg import VGG, make_layers

from pipeline.classes import NUM_CLASSES
from pipeline.data.sample_scene import classification_crop
from pipeline.data.transforms import normalize
from pipeline.models.surgery import VGG16_CFG, vgg16_channels
from pipeline.training.solver import lr_factor

CROP_SIZE = 224  # VGG16's input: pool5 is then 7 x 7, exactly what fc6 (a Linear on 512*7*7) reads


def vgg16_classifier(width: float, num_classes: int = NUM_CLASSES, dropout: float = 0.5) -> VGG:
    """torchvision's VGG16 (configuration D) with every layer's channels scaled by `width`.

    Same module tree and state-dict keys as `torchvision.models.vgg16()` (features.0 ...
    features.28, classifier.0/3/6), so `pipeline.models.surgery.load_vgg16_backbone` reads it exactly
    as it reads the ImageNet file. Weights are torchvision's init (kaiming conv, N(0, 0.01) fc).
    Input: float32 [N, 3, 224, 224], ImageNet-normalised RGB; output: logits [N, num_classes].
    """
    convs, fc = vgg16_channels(width)
    it = iter(convs)
    cfg = ["M" if v == "M" else next(it) for v in VGG16_CFG]
    model = VGG(make_layers(cfg), num_classes=num_classes, init_weights=True, dropout=dropout)
    # torchvision hard-codes the 4096-wide classifier: rebuild it at this width, same indices
    model.classifier = nn.Sequential(
        nn.Linear(convs[-1] * 7 * 7, fc),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(fc, fc),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(fc, num_classes),
    )
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def vgg16_bn_classifier(width: float, num_classes: int = NUM_CLASSES, dropout: float = 0.5) -> VGG:
    """`vgg16_classifier` with batch norm after every conv (torchvision's `vgg16_bn` layout).

    Trained instead of the plain net because a 13-conv VGG without normalisation barely moves
    in the few hundred steps the sample can afford; `fold_batchnorm` then turns it into the
    plain VGG16 the FCN expects, exactly (in eval mode).
    """
    plain = vgg16_classifier(width, num_classes, dropout)
    convs, _ = vgg16_channels(width)
    it = iter(convs)
    cfg = ["M" if v == "M" else next(it) for v in VGG16_CFG]
    plain.features = make_layers(cfg, batch_norm=True)
    for m in plain.features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    # He init for fc6-fc8 too, not torchvision's N(0, 0.01): at 1/8 width that init shrinks the
    # signal ~30x across the three layers, which a run of a few hundred steps cannot undo
    for m in plain.classifier:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return plain


@torch.no_grad()
def fold_batchnorm(model: VGG) -> dict[str, torch.Tensor]:
    """State dict of the plain VGG16 that computes what `model` (a `vgg16_bn`) does in eval mode.

    Each conv + BatchNorm pair becomes one conv: w' = w * g / sqrt(v + eps) per output channel,
    b' = (b - m) * g / sqrt(v + eps) + beta (the standard inference-time fusion, as in
    `torch.nn.utils.fusion.fuse_conv_bn_weights`). Keys follow torchvision's plain `vgg16`
    (`features.0, 2, 5, ...`, i.e. without the BN modules); the classifier is copied as is.
    Tensors: float32 on the CPU.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    layers = list(model.features)
    out: dict[str, torch.Tensor] = {}
    plain_index = 0
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            bn = layers[i + 1]
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError(f"features.{i + 1}: expected BatchNorm2d after a conv, got {bn}")
            w, b = fuse_conv_bn_weights(
                layer.weight,
                layer.bias,
                bn.running_mean,
                bn.running_var,
                bn.eps,
                bn.weight,
                bn.bias,
            )
            out[f"features.{plain_index}.weight"] = w.detach().float().cpu().contiguous()
            out[f"features.{plain_index}.bias"] = b.detach().float().cpu().contiguous()
            i += 3  # conv, bn, relu
            plain_index += 2  # conv, relu
        else:  # max pool
            i += 1
            plain_index += 1
    for k, v in model.classifier.state_dict().items():
        out[f"classifier.{k}"] = v.detach().float().cpu().contiguous()
    return out


class ClassificationCrops(Dataset):
    """Crops k = start .. start + n - 1 of `classification_crop`, class k % 21, as a Dataset.

    Item: (uint8 [3, size, size], int64 class). Each crop is drawn from its own stream, so the
    set is the same whatever the number of DataLoader workers that render it.
    """

    def __init__(self, seed: int, n: int, start: int = 0, size: int = CROP_SIZE) -> None:
        self.seed, self.n, self.start, self.size = seed, n, start, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k = self.start + i
        crop = classification_crop(self.seed, k, self.size, k % NUM_CLASSES)
        return torch.from_numpy(crop).permute(2, 0, 1), k % NUM_CLASSES


def classification_set(
    seed: int, n_per_class: int, start: int = 0, size: int = CROP_SIZE, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_per_class` crops of each of the 21 classes: (uint8 [N, 3, size, size], int64 [N]).

    Crop k (k = start, start + 1, ...) has class k % 21, so disjoint `start` ranges give
    disjoint train and val sets. Rendered by `workers` DataLoader processes (0: in this one).
    """
    crops = ClassificationCrops(seed, n_per_class * NUM_CLASSES, start, size)
    loader = DataLoader(crops, batch_size=32, num_workers=workers)
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32
) -> float:
    """Top-1 accuracy (0..1) of `model` on uint8 `images` [N, 3, H, W] with int64 `labels` [N]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


def pretrain_vgg16(
    *,
    width: float,
    seed: int,
    train_per_class: int,
    val_per_class: int,
    epochs: int,
    batch_size: int,
    lr: float,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the width-reduced VGG16 classifier on the sample's crops; return plain VGG16 weights.

    Trains `vgg16_bn_classifier` (no dropout: the crops are few and the run short) with Adam
    and poly lr decay on `train_per_class` x 21 crops, random horizontal flips, fp32, then folds
    the batch norms away (`fold_batchnorm`). Same seed, same machine: the same weights.
    Returns the state dict (torchvision `vgg16` keys, CPU float32) and a report: held-out and
    train top-1 accuracy (0..1) of the folded net, chance level, mean cross-entropy of the
    first and last epoch, crop counts, epochs.
    """
    torch.manual_seed(seed)
    n_train = train_per_class * NUM_CLASSES
    train_x, train_y = classification_set(seed, train_per_class, start=0, workers=workers)
    val_x, val_y = classification_set(seed, val_per_class, start=n_train, workers=workers)
    model = vgg16_bn_classifier(width, dropout=0.0).to(memory_format=torch.channels_last)
    epoch_losses = _fit(model, train_x, train_y, epochs, batch_size, lr, seed, progress)
    model.eval()
    state = fold_batchnorm(model)
    plain = vgg16_classifier(width, dropout=0.0)
    plain.load_state_dict(state)
    report = {
        "source": "pretrained on the sample's object crops (pipeline/training/pretrain.py)",
        "classes": NUM_CLASSES,
        "train_crops": n_train,
        "val_crops": len(val_y),
        "epochs": epochs,
        "train_loss_first_epoch": round(epoch_losses[0], 4),
        "train_loss_last_epoch": round(epoch_losses[-1], 4),
        "train_top1": round(classification_accuracy(plain, train_x, train_y), 4),
        "val_top1": round(classification_accuracy(plain, val_x, val_y), 4),
        "chance_top1": round(1.0 / NUM_CLASSES, 4),
    }
    return state, report


def _fit(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> list[float]:
    """Adam with poly decay over `epochs` of the uint8 crops `train_x` [N, 3, H, W] (labels
    `train_y` [N] int64), a seeded order and random flips per epoch. Returns each epoch's mean
    cross-entropy."""
    from tqdm import tqdm

    n_train = len(train_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total = math.ceil(n_train / batch_size) * epochs
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="pretrain vgg16", unit="it", disable=not progress)
    step = 0
    epoch_losses: list[float] = []
    model.train()
    for _ in range(epochs):
        losses = []
        order = torch.randperm(n_train, generator=gen)
        flips = torch.rand(n_train, generator=gen) < 0.5
        for i in range(0, n_train, batch_size):
            idx = order[i : i + batch_size]
            x = torch.where(flips[idx].view(-1, 1, 1, 1), train_x[idx].flip(-1), train_x[idx])
            x = normalize(x).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor("poly", step, total)
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        epoch_losses.append(sum(losses) / len(losses))
    bar.close()
    return epoch_losses


def save_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict atomically, byte-identical for identical tensors."""
    from pipeline.atomic import atomic_path

    # into an open file: given a path, torch names the zip root after the random temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
