"""The `evaluate` params section, typed (a frozen view of the validated profile:
`pipeline.sections`; keys and defaults documented in `pipeline.config.SCHEMA`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sections import typed_section


@dataclass(frozen=True)
class TtaConfig:
    """Test-time augmentation, scored apart from Table 2: horizontal flip, scale factors."""

    flip: bool
    scales: tuple[float, ...]


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` section: where and how the models are scored, and on what."""

    device: str  # auto | cpu | cuda
    precision: str  # auto | fp32 | bf16 | fp16
    batch_size: int
    qualitative_images: int
    split: str  # voc2012_val | seg11valid
    allow_partial_split: bool
    tta: TtaConfig


def evaluate_config(cfg: Mapping[str, Any]) -> EvaluateConfig:
    """The typed `evaluate` section of the active profile `cfg` (`load_params`)."""
    return typed_section(cfg, "evaluate", EvaluateConfig)
