"""Where a training stage starts: the interrupted run's state, or the stage's initial model.

FCN-32s starts from ImageNet VGG16 (fc6/fc7 reshaped into convolutions, section 3.1 of the
paper) or at random; FCN-16s and FCN-8s start from the previous stage's model, transplanted
layer by layer (section 4.2: "staged training").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.classes import NUM_CLASSES
from pipeline.models.surgery import fix_upsampling
from pipeline.training.distributed import dist_info
from pipeline.training.recipe import ModelConfig, StageRecipe, TrainConfig
from pipeline.training.resume import ResumeState, ResumeStore, check_same_start, set_rng_state
from pipeline.training.solver import make_optimizer, use_sgd_implementation


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout layer's probability (the paper: 0.5 after fc6 and fc7)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.p = p


def build_initial_model(
    name: str,
    *,
    width: float,
    backbone_init: str,
    vgg16_path: Path | None,
    init_from: Path | None,
    seed: int,
) -> tuple[nn.Module, list[str]]:
    """The model a training stage starts from, and a log of what was initialised how.

    Raises:
        ValueError: the VGG16 weights are missing or not a loadable state dict.
    """
    from pipeline.models.caffe_vgg16 import load_vgg16_weights
    from pipeline.models.fcn import NORMALIZATION, CaffeInput, build_model, load_model
    from pipeline.models.surgery import init_random, load_vgg16_backbone, transplant

    torch.manual_seed(seed)
    model = build_model(name, num_classes=NUM_CLASSES, width=width)
    if init_from is not None:  # FCN-16s from FCN-32s, FCN-8s from FCN-16s
        src = load_model(init_from, map_location="cpu")
        copied = transplant(src, model)
        # the input convention travels with the weights: a Caffe-initialised FCN-32s makes
        # Caffe-input FCN-16s/8s (no tensors in the adapter, so transplant cannot carry it)
        model.input_adapter = src.input_adapter
        return model, [f"transplanted {len(copied)} tensors from {init_from}"]
    init_random(model, seed)
    if backbone_init == "vgg16":
        if vgg16_path is None:
            raise ValueError("backbone_init 'vgg16' needs the VGG16 weights file")
        try:
            state, normalization = load_vgg16_weights(vgg16_path)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        load_vgg16_backbone(model, state, source=str(vgg16_path))
        if normalization == NORMALIZATION:
            return model, [f"VGG16 backbone from {vgg16_path}"]
        # weights made for another input (the Caffe VGG16: BGR 0..255 minus the mean): the
        # model converts the pipeline's input into theirs, and its file records it
        model.input_adapter = CaffeInput.from_spec(normalization)
        return model, [f"VGG16 backbone from {vgg16_path}, input {normalization}"]
    return model, ["random initialisation"]


def start_or_resume(
    recipe: StageRecipe,
    tc: TrainConfig,
    mc: ModelConfig,
    store: ResumeStore,
    *,
    vgg16_path: Path | None,
    init_from: Path | None,
    device: torch.device,
    say: Callable[..., None] = print,
) -> tuple[nn.Module, torch.optim.SGD, ResumeState]:
    """The model, optimiser and progress a run starts from: the interrupted run's, when
    `store` holds one for these inputs, else the stage's initial model at iteration 0 (saying
    which interrupted runs of other inputs are not resumed, and why).

    The global RNG is seeded with seed + rank (each rank draws its own dropout masks,
    reproducibly; augmentation is seeded per sample), then restored from the checkpoint.

    Raises:
        RuntimeError: under DDP, the ranks found different resume states.
        ValueError: the VGG16 weights are missing or unusable.
    """
    rank, world = dist_info()
    state = store.load()
    check_same_start(state.iteration if state is not None else 0, store, device, world)
    model, init_log = build_initial_model(
        recipe.architecture,
        width=mc.width,
        backbone_init=mc.backbone_init,
        vgg16_path=vgg16_path,
        init_from=init_from,
        seed=tc.seed,
    )
    set_dropout(model, mc.dropout)
    if not tc.learn_upsampling:
        fix_upsampling(model)  # before the optimiser: it leaves frozen parameters out
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        model, recipe.lr, tc.momentum, tc.weight_decay, device, score_lr_mult=tc.score_lr_mult
    )
    torch.manual_seed(tc.seed + rank)
    if state is not None:
        _restore(model, optimizer, state, rank, device)
        say(
            f"[train] {recipe.name}: resuming from {store.checkpoint_path} at iteration "
            f"{state.iteration}",
            flush=True,
        )
        return model, optimizer, state
    for line in [*store.why_not_resumed(), "; ".join(init_log)]:
        say(f"[train] {recipe.name}: {line}", flush=True)
    return model, optimizer, ResumeState.fresh(store.fingerprint)


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: ResumeState,
    rank: int,
    device: torch.device,
) -> None:
    """Weights, optimiser (with this device's SGD kernels) and this rank's RNG from `state`."""
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    use_sgd_implementation(optimizer, device)
    set_rng_state(state.rng[rank])
