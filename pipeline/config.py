"""params.yaml: load the profile Hydra composed from conf/ and reject every mistake before any
work starts.

Each error names the key's full path (`train.fcn8s.lr`), what was found and what is allowed, so
that a typo fails in a second instead of after an hour of preprocessing.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("sample", "full", "paper")
CASCADE = ("fcn32s", "fcn16s", "fcn8s")  # the training stages, in the cascade's order
ATONCE = "fcn8s_atonce"  # the at-once FCN-8s: the fcn8s stage's net with `at_once`
ARCHITECTURES = (*CASCADE, ATONCE)  # every net a model file can hold
MIN_CROP = 32  # the network has stride 32: a smaller crop has no pixel of pool5 context


class ParamsError(ValueError):
    """A params.yaml mistake; the message names the file and the key path."""


# --- a tiny schema language: a spec is a type check plus optional constraints -------------------


def architecture(stage: str, train: Mapping[str, Any]) -> str:
    """The net a training stage trains (`train`: the params' train section): the stage's own
    name, or "fcn8s_atonce" for the fcn8s stage with `fcn8s.at_once` (the release's FCN-8s
    at-once, fixed skip scales, trained from VGG16)."""
    return ATONCE if train[stage].get("at_once", False) else stage


def initialised_from(stage: str, train: Mapping[str, Any]) -> str | None:
    """The stage whose model file `stage` starts from (`previous_stage`), from the params'
    train section `train`."""
    return previous_stage(stage, architecture(stage, train) == ATONCE)


def previous_stage(stage: str, at_once: bool) -> str | None:
    """The stage whose model file `stage` starts from (FCN-16s from FCN-32s, FCN-8s from
    FCN-16s: the paper's staged training), or None: from VGG16 (FCN-32s, at-once FCN-8s)."""
    i = CASCADE.index(stage)
    return None if i == 0 or at_once else CASCADE[i - 1]


class Spec:
    """One leaf key: its `kind` (int, float, bool, str, list[str], list[float], pair[float]),
    an optional `check` (value -> error text or None) and constraints in `kw`: `nullable`,
    `choices`, `min`, `gt`, `max`, `default` (the key's one default, filled in when absent)."""

    def __init__(self, kind: str, check: Callable[[Any], str | None] | None = None, **kw: Any):
        self.kind, self.check, self.kw = kind, check, kw

    def validate(self, value: Any, path: str) -> list[str]:
        """The errors of `value` at key path `path` (empty when it is valid)."""
        nullable = self.kw.get("nullable", False)
        if value is None:
            return [] if nullable else [f"{path}: must be set ({self.kind}), got null"]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "list[float]": isinstance(value, list)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value),
            "pair[float]": isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value),
        }[self.kind]
        if not ok:
            return [f"{path}: expected {self.kind}, got {type(value).__name__} {value!r}"]
        choices = self.kw.get("choices")
        if choices is not None and value not in choices:
            return [f"{path}: {value!r} is not one of {', '.join(map(str, choices))}"]
        if "min" in self.kw and value < self.kw["min"]:
            return [f"{path}: must be >= {self.kw['min']}, got {value!r}"]
        if "gt" in self.kw and value <= self.kw["gt"]:
            return [f"{path}: must be > {self.kw['gt']}, got {value!r}"]
        if "max" in self.kw and value > self.kw["max"]:
            return [f"{path}: must be <= {self.kw['max']}, got {value!r}"]
        if self.check is not None:
            msg = self.check(value)
            if msg:
                return [f"{path}: {msg}"]
        return []


def _int(**kw: Any) -> Spec:
    return Spec("int", **kw)


def _float(**kw: Any) -> Spec:
    return Spec("float", **kw)


def _str(**kw: Any) -> Spec:
    return Spec("str", **kw)


def _bool(**kw: Any) -> Spec:
    return Spec("bool", **kw)


def _check_urls(urls: list[str]) -> str | None:
    from urllib.parse import urlparse

    for u in urls:
        scheme = urlparse(u).scheme.lower()
        # a bare path (no scheme, or a Windows drive letter) is a local source
        if scheme not in ("http", "https", "file", "") and len(scheme) > 1:
            return f"source {u!r} has scheme {scheme!r}; only http(s)://, file:// or a local path"
    return None


def _check_scale(v: list[float]) -> str | None:
    lo, hi = v
    if not 0 < lo <= hi:
        return f"needs 0 < low <= high, got {v!r}"
    return None


def _check_endpoint(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT (node 0's address and a free port), got {v!r}"
    return None


def _hex(length: int | None) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        ok = all(c in "0123456789abcdefABCDEF" for c in v) and v
        if not ok or (length is not None and len(v) != length):
            return f"expected {length or 'some'} hex digits, got {v!r}"
        return None

    return check


def _source() -> dict[str, Any]:
    return {
        "urls": Spec("list[str]", _check_urls),
        "md5": Spec("str", _hex(32), nullable=True),
        "size": _int(nullable=True, min=1),
    }


SBD_CHOICES = ("train", "train_noval")
_DEVICE = _str(choices=("auto", "cpu", "cuda"))
_PRECISION = _str(choices=("auto", "fp32", "bf16", "fp16"))

SCHEMA: dict[str, Any] = {
    "download": {
        "generate_sample": _bool(),
        "sample": {
            "seed": _int(min=0),
            "voc_train": _int(min=2),
            "voc_val": _int(min=1),
            "coco_train": _int(min=0),
            "coco_val": _int(min=0),
            "min_side": _int(min=33),
            "max_side": _int(min=33, max=4096),
        },
        "voc": _source(),
        "coco_train": _source(),
        "coco_val": _source(),
        "coco_annotations": _source(),
        "sbd": _source(),  # SBD benchmark.tgz (Hariharan et al. 2011): the paper's train set
        "vgg16": {
            # torchvision: a VGG16 state dict (RGB 0..1, ImageNet mean/std), torchvision's file;
            # caffe: VGG_ILSVRC_16_layers.caffemodel (BGR 0..255 minus the mean), the FCN
            # release's backbone, converted on download (pipeline.models.caffe_vgg16)
            "format": _str(choices=("torchvision", "caffe"), default="torchvision"),
            "urls": Spec("list[str]", _check_urls),
            "md5": Spec("str", _hex(32), nullable=True, default=None),
            "sha256_prefix": Spec("str", _hex(None), nullable=True),
            "size": _int(nullable=True, min=1),
            # the sample's stand-in for ImageNet: a VGG16 classifier trained on object crops
            "pretrain": {
                "train_per_class": _int(min=1),
                "val_per_class": _int(min=1),
                "epochs": _int(min=1),
                "batch_size": _int(min=1),
                "lr": _float(gt=0),
                "workers": _int(min=0, max=256),
            },
        },
        "retries": _int(min=0, max=100),
        "timeout_s": _float(gt=0),
    },
    "coco_to_voc": {
        "splits": Spec(
            "list[str]",
            lambda v: (
                None
                if set(v) <= {"train2017", "val2017"}
                else f"unknown split(s) {sorted(set(v) - {'train2017', 'val2017'})}; use train2017/val2017"
            ),
        ),
        "min_pixels": _int(min=0),
        "workers": _int(min=1, max=256),
        "shard_size": _int(min=1),
        "max_rejected_fraction": _float(min=0, max=1),
    },
    "preprocess": {
        "max_size": _int(min=MIN_CROP, max=4096),
        "jpeg_quality": _int(min=1, max=100),
        "shard_size": _int(min=1),
        # training sources: VOC 2012 train, SBD (train, or train_noval: minus VOC 2012 val's
        # images, excluded automatically and counted in the report), COCO-VOC
        "voc_train": _bool(default=True),
        "sbd": _str(choices=SBD_CHOICES, nullable=True, default=None),
        "use_coco": _bool(),
        "workers": _int(min=1, max=256),
        "max_bad_fraction": _float(min=0, max=1),
    },
    "model": {
        "width": _float(gt=0, max=1),
        "backbone_init": _str(choices=("vgg16", "random")),
        "dropout": _float(min=0, max=0.99),
    },
    "train": {
        "device": _DEVICE,
        "precision": _PRECISION,
        "channels_last": _bool(),
        "nproc": _int(min=1, max=1024),  # processes per node
        # Multi-node DDP: every node runs the stage with the same params except node_rank.
        "nnodes": _int(min=1, max=4096, default=1),
        "node_rank": _int(min=0, default=0),
        "rdzv_endpoint": Spec("str", _check_endpoint, nullable=True, default=None),
        "compile": _bool(default=False),  # torch.compile the training forward/backward
        "batch_size": _int(min=1),
        "accumulate": _int(min=1),
        "workers": _int(min=0, max=256),
        "seed": _int(min=0),
        "crop_size": _int(min=MIN_CROP, max=4096),
        "scale_range": Spec("pair[float]", _check_scale),
        "hflip": _bool(),
        "color_jitter": _float(min=0, max=1),
        "loss": _str(choices=("mean", "sum")),
        "lr_policy": _str(choices=("fixed", "poly")),
        "momentum": _float(min=0, max=1),  # max=1 inclusive is still nonsense; see below
        "weight_decay": _float(min=0),
        # lr factor of the zero-initialised score layers (the paper: 1)
        "score_lr_mult": _float(gt=0, default=1.0),
        # false: every upsampling layer stays bilinear (the release's lr_mult 0); true: the 2x
        # upsamplings of FCN-16s/8s learn (the paper's text)
        "learn_upsampling": _bool(default=True),
        "checkpoint_every": _int(min=1),
        "checkpoint_minutes": _float(gt=0, nullable=True),
        "val_every": _int(min=1),  # epochs
        # also validate every N iterations inside epochs (null: only at epoch ends)
        "val_every_iter": _int(min=1, nullable=True, default=None),
        # max_iter: the budget in iterations (epochs then derived, the last one cut short), so a
        # recipe means the same on 1.5k or 100k images; null: `epochs` full epochs
        **{
            m: {
                "epochs": _int(min=1),
                "lr": _float(gt=0),
                "max_iter": _int(min=1, nullable=True, default=None),
                # FCN-8s only: the at-once net (fixed pool3/pool4 scales) trained straight from
                # VGG16 instead of fine-tuned from FCN-16s (models/fcn16s.pt is then unused)
                **({"at_once": _bool(default=False)} if m == "fcn8s" else {}),
            }
            for m in CASCADE
        },
    },
    "evaluate": {
        "device": _DEVICE,
        "precision": _PRECISION,
        "batch_size": _int(min=1),
        "qualitative_images": _int(min=0, max=64),
        # what is scored: all of VOC 2012 val, or the paper's seg11valid (pipeline/data/splits.py)
        "split": _str(choices=("voc2012_val", "seg11valid"), default="voc2012_val"),
        # seg11valid with only some of its 736 images in the val shards: score those (the
        # summary says how many) instead of refusing; for tests and dry runs, never for figures
        "allow_partial_split": _bool(default=False),
        # test-time augmentation, scored apart from Table 2 (reports/tta/<model>.json)
        "tta": {
            "flip": _bool(default=False),
            "scales": Spec(
                "list[float]",
                lambda v: None if v and all(x > 0 for x in v) else "needs positive scales",
                default=[1.0],
            ),
        },
    },
    # speed and memory of the trained models (stage inference_report); a params file written
    # before these sections existed gets the defaults
    "inference": {
        "warmup": _int(min=0, max=1000, default=1),  # untimed passes over the inputs
        "repeats": _int(min=1, max=10000, default=3),  # timed passes
        "val_images": _int(min=0, default=2),  # val images timed at their own size
    },
    "export": {  # stage export_onnx
        "opset": _int(min=18, max=30, default=18),
        "val_images": _int(min=0, default=2),  # real val images checked against PyTorch
        "min_agreement": _float(min=0, max=1, default=0.999),  # argmax pixels, each input
    },
}


def _all_defaults(schema: dict[str, Any]) -> bool:
    return all(
        _all_defaults(s) if isinstance(s, dict) else "default" in s.kw for s in schema.values()
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate_tree(tree: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Errors of `tree` against `schema`; a missing key whose spec has a `default` is filled
    in (in place) instead, so params files written before the key existed still load."""
    if not isinstance(tree, dict):
        return [f"{path}: expected a mapping, got {type(tree).__name__} {tree!r}"]
    errors = []
    for key in tree:
        if key not in schema:
            known = ", ".join(schema)
            errors.append(f"{_join(path, key)}: unknown key (known keys here: {known})")
    for key, spec in schema.items():
        sub = _join(path, key)
        if key not in tree and isinstance(spec, Spec) and "default" in spec.kw:
            tree[key] = spec.kw["default"]
        elif key not in tree and isinstance(spec, dict) and _all_defaults(spec):
            tree[key] = {}  # a whole section of defaults, filled in below
        if key not in tree:
            errors.append(f"{sub}: missing")
        elif isinstance(spec, dict):
            errors.extend(validate_tree(tree[key], spec, sub))
        else:
            errors.extend(spec.validate(tree[key], sub))
    return errors


def _cross_checks(cfg: dict[str, Any]) -> list[str]:
    errors = []
    s = cfg["download"]["sample"]
    if s["min_side"] > s["max_side"]:
        errors.append(f"download.sample.min_side: {s['min_side']} > max_side {s['max_side']}")
    errors.extend(train_checks(cfg["train"], "train"))
    errors.extend(_training_data_checks(cfg))
    if not cfg["download"]["generate_sample"]:
        for name in ("voc", "coco_train", "coco_val", "coco_annotations", "sbd", "vgg16"):
            if not cfg["download"][name]["urls"]:
                errors.append(f"download.{name}.urls: no source given for a real download")
    return errors


def train_checks(t: Mapping[str, Any], path: str) -> list[str]:
    """What the train section's keys must satisfy together (`path`: the section's key path).
    The rendezvous: node 0's address for several nodes, a node rank below their count."""
    errors = []
    if t["nnodes"] > 1 and t["rdzv_endpoint"] is None:
        errors.append(
            f"{path}.rdzv_endpoint: must be set (HOST:PORT of node 0) when "
            f"train.nnodes is {t['nnodes']} > 1"
        )
    if t["node_rank"] >= t["nnodes"]:
        errors.append(f"{path}.node_rank: {t['node_rank']} is not below train.nnodes {t['nnodes']}")
    if t["momentum"] >= 1:
        errors.append(f"{path}.momentum: must be < 1, got {t['momentum']}")
    return errors


def _training_data_checks(cfg: dict[str, Any]) -> list[str]:
    """What trains against what scores: at least one training source, and no scored image
    trained on. SBD re-annotates VOC 2011 images: its train set holds most of VOC 2012 val
    (hence seg11valid, VOC 2011 val minus SBD train, in the paper). VOC 2012 train, SBD
    train_noval and COCO are disjoint from both evaluation splits; evaluate checks the actual
    image ids again before scoring."""
    p = cfg["preprocess"]
    if not (p["voc_train"] or p["sbd"] or p["use_coco"]):
        return ["preprocess: no training source (voc_train, sbd and use_coco all off)"]
    if p["sbd"] == "train" and cfg["evaluate"]["split"] == "voc2012_val":
        return [
            "preprocess.sbd: SBD train holds most of VOC 2012 val's images, which "
            "evaluate.split voc2012_val scores; use sbd: train_noval (those images excluded) "
            "or evaluate.split: seg11valid (the paper's protocol)"
        ]
    return []


def _checksums_as_text(profile: Any) -> None:
    """In place: an int under `download.*.md5`/`sha256_prefix` becomes its decimal text (what
    a YAML or JSON writer gives for an unquoted all-digit checksum)."""
    download = profile.get("download") if isinstance(profile, dict) else None
    if not isinstance(download, dict):
        return
    for source in download.values():
        if isinstance(source, dict):
            for key in TEXT_KEYS & source.keys():
                v = source[key]
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    source[key] = str(v)


def validate_params(params: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Validate params.yaml (one profile, as Hydra composes it from conf/) and return it.

    Defaults of absent keys are filled in from `SCHEMA`. An all-digit checksum given as an int
    (`sha256_prefix: 12345678`) is accepted as its text, in place; `load_params` keeps the text
    as written, leading zeros included.

    Raises:
        ParamsError: every problem found, each with its key path.
    """
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level")
    profile = params.get("profile")
    errors = [] if profile in PROFILES else [f"profile: {profile!r} is not one of {PROFILES}"]
    sections = {k: v for k, v in params.items() if k != "profile"}
    _checksums_as_text(sections)
    errs = validate_tree(sections, SCHEMA, "")
    errors.extend(errs)
    if not errs:
        errors.extend(_cross_checks(sections))
    if errors:
        raise ParamsError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return {"profile": profile, **sections}


# Checksum keys are text even when unquoted: `dvc exp run -S ...sha256_prefix=01234567` writes
# the digits unquoted, which YAML would read as an int (dropping the leading zero) or a float
# (`12e45678`). Their plain scalars are taken as the text written.
TEXT_KEYS = frozenset({"md5", "sha256_prefix"})
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 plus YAML 1.2 floats without a dot (`1e-10`): DVC writes params.yaml
    in YAML 1.2, so `dvc exp run -S train.fcn32s.lr=1e-10` leaves `lr: 1e-10` there.
    Numbers under `TEXT_KEYS` are read as their text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        for key_node, value_node in node.value:
            if (
                isinstance(key_node, yaml.ScalarNode)
                and key_node.value in TEXT_KEYS
                and isinstance(value_node, yaml.ScalarNode)
                and value_node.tag in _NUMBER_TAGS
            ):
                value_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Read params.yaml, validate it and return it: `profile` (its name) and every section.

    Raises:
        ParamsError: the file is missing, not YAML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    try:
        params = yaml.load(text, Loader=ParamsLoader)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return validate_params(params, str(path))


def checked_section(cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """A validated copy of `cfg[section]`, defaults filled in from `SCHEMA` (the one place
    they are written). A dict from `load_params` passes unchanged.

    Raises:
        ParamsError: a key is missing, unknown or out of bounds.
    """
    tree = copy.deepcopy(dict(cfg[section]))
    errors = validate_tree(tree, SCHEMA[section], section)
    if not errors and section == "train":
        errors = train_checks(tree, section)
    if errors:
        raise ParamsError(f"{section}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return tree
