"""The `inference` and `export` params sections, typed (frozen views of the validated
profile: `pipeline.sections`; keys and defaults documented in `pipeline.config.SCHEMA`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sections import typed_section


@dataclass(frozen=True)
class InferenceConfig:
    """The `inference` section (stage inference_report): untimed warm-up passes, timed
    repeats, val images timed at their own size."""

    warmup: int
    repeats: int
    val_images: int


@dataclass(frozen=True)
class ExportConfig:
    """The `export` section (stage export_onnx): ONNX opset, real val images checked against
    PyTorch, the least argmax agreement per input (a fraction)."""

    opset: int
    val_images: int
    min_agreement: float


def inference_config(cfg: Mapping[str, Any]) -> InferenceConfig:
    """The typed `inference` section of the active profile `cfg` (`load_params`)."""
    return typed_section(cfg, "inference", InferenceConfig)


def export_config(cfg: Mapping[str, Any]) -> ExportConfig:
    """The typed `export` section of the active profile `cfg`."""
    return typed_section(cfg, "export", ExportConfig)
