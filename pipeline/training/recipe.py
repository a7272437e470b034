"""The training recipe, typed: frozen views of the `train` and `model` params sections.

Built once per stage from the validated profile (`pipeline.config.load_params`); every default
lives in `pipeline.config.SCHEMA` and is filled in by `checked_section`, so the loop, the solver
and the resume code read fields, never dict keys with fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pipeline.config import ATONCE, CASCADE, checked_section, previous_stage
from pipeline.sections import typed_section


@dataclass(frozen=True)
class StageRecipe:
    """One training stage's budget and rate (`train.<stage>`)."""

    name: str  # fcn32s | fcn16s | fcn8s
    epochs: int
    lr: float  # the base learning rate (before lr_mult and the lr policy)
    max_iter: int | None  # the budget in optimiser steps; None: `epochs` full epochs
    at_once: bool  # fcn8s only: the at-once net, trained from VGG16

    @property
    def architecture(self) -> str:
        """The net this stage trains (see `architecture`)."""
        return ATONCE if self.at_once else self.name

    @property
    def initialised_from(self) -> str | None:
        """The stage whose model file this one starts from (`previous_stage`); None: VGG16."""
        return previous_stage(self.name, self.at_once)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section, typed; one field per key (`SCHEMA["train"]` documents them)."""

    device: str
    precision: str
    channels_last: bool
    nproc: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None
    compile: bool
    batch_size: int
    accumulate: int
    workers: int
    seed: int
    crop_size: int
    scale_range: tuple[float, float]
    hflip: bool
    color_jitter: float
    loss: str
    lr_policy: str
    momentum: float
    weight_decay: float
    score_lr_mult: float
    learn_upsampling: bool
    checkpoint_every: int
    checkpoint_minutes: float | None
    val_every: int
    val_every_iter: int | None
    stages: Mapping[str, StageRecipe]  # by stage name, CASCADE

    @property
    def processes(self) -> int:
        """DDP processes in all (`nproc` per node times `nnodes`)."""
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section, typed."""

    width: float
    backbone_init: str  # vgg16 | random
    dropout: float


def train_config(cfg: Mapping[str, Any]) -> TrainConfig:
    """The typed `train` section of `cfg` (the active profile, as `load_params` returns it).

    Raises:
        ParamsError: the section does not validate against `SCHEMA["train"]`.
    """
    t = checked_section(cfg, "train")
    stages = {
        m: StageRecipe(
            name=m,
            epochs=t[m]["epochs"],
            lr=t[m]["lr"],
            max_iter=t[m]["max_iter"],
            at_once=t[m].get("at_once", False),  # only fcn8s has the key
        )
        for m in CASCADE
    }
    plain = {f.name: t[f.name] for f in fields(TrainConfig) if f.name != "stages"}
    plain["scale_range"] = tuple(plain["scale_range"])
    return TrainConfig(**plain, stages=stages)


def model_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """The typed `model` section of `cfg` (the active profile).

    Raises:
        ParamsError: the section does not validate against `SCHEMA["model"]`.
    """
    return typed_section(cfg, "model", ModelConfig)
