"""The data stages' params sections, typed: `download`, `coco_to_voc`, `preprocess`.

Frozen views of the validated profile (`pipeline.sections`); the keys, bounds and defaults are
documented once, in `pipeline.config.SCHEMA` and conf/profile/*.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sections import typed_section


@dataclass(frozen=True)
class Source:
    """A pinned file (`download.voc`, `.coco_*`, `.sbd`): sources tried in order, its md5 and
    size in bytes (None: not checked)."""

    urls: tuple[str, ...]
    md5: str | None
    size: int | None


@dataclass(frozen=True)
class SampleSpec:
    """The generated sample (`download.sample`): seed, image counts, side range in px."""

    seed: int
    voc_train: int
    voc_val: int
    coco_train: int
    coco_val: int
    min_side: int
    max_side: int


@dataclass(frozen=True)
class PretrainSpec:
    """The sample's stand-in for ImageNet (`download.vgg16.pretrain`): crops per class, epochs,
    batch, Adam's lr, loader processes (`pipeline.training.pretrain.pretrain_vgg16`)."""

    train_per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    lr: float
    workers: int


@dataclass(frozen=True)
class Vgg16Source:
    """The backbone (`download.vgg16`): torchvision's state dict or the Caffe model zoo file
    (`format`), its pins, and the sample's pretraining."""

    format: str  # torchvision | caffe
    urls: tuple[str, ...]
    md5: str | None
    sha256_prefix: str | None
    size: int | None
    pretrain: PretrainSpec


@dataclass(frozen=True)
class DownloadConfig:
    """The `download` section: generate the sample or fetch the pinned files; `retries` per
    source and a `timeout_s` in seconds per connection."""

    generate_sample: bool
    sample: SampleSpec
    voc: Source
    coco_train: Source
    coco_val: Source
    coco_annotations: Source
    sbd: Source
    vgg16: Vgg16Source
    retries: int
    timeout_s: float


@dataclass(frozen=True)
class CocoToVocConfig:
    """The `coco_to_voc` section (`pipeline.data.coco_voc.convert_split`)."""

    splits: tuple[str, ...]  # train2017 and/or val2017
    min_pixels: int
    workers: int
    shard_size: int
    max_rejected_fraction: float


@dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` section (`pipeline.data.preprocess.preprocess`)."""

    max_size: int  # px, the longer side of a training image
    jpeg_quality: int
    shard_size: int
    voc_train: bool
    sbd: str | None  # train | train_noval | None
    use_coco: bool
    workers: int
    max_bad_fraction: float


def download_config(cfg: Mapping[str, Any]) -> DownloadConfig:
    """The typed `download` section of the active profile `cfg` (`load_params`)."""
    return typed_section(cfg, "download", DownloadConfig)


def coco_to_voc_config(cfg: Mapping[str, Any]) -> CocoToVocConfig:
    """The typed `coco_to_voc` section of the active profile `cfg`."""
    return typed_section(cfg, "coco_to_voc", CocoToVocConfig)


def preprocess_config(cfg: Mapping[str, Any]) -> PreprocessConfig:
    """The typed `preprocess` section of the active profile `cfg`."""
    return typed_section(cfg, "preprocess", PreprocessConfig)
