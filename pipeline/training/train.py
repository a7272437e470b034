"""Training loop for FCN-32s -> FCN-16s -> FCN-8s: staged, resumable, DDP-ready, seeded.

One `train()` call trains one stage of the paper's cascade:
- FCN-32s starts from ImageNet VGG16 (fc6/fc7 reshaped into convolutions) or at random;
- FCN-16s and FCN-8s start from the previous stage's model, transplanted layer by layer.

Resumption. DVC 3 has no built-in checkpoints, and resume state kept in a DVC output costs
twice: `dvc exp run` checks out the committed version of a `persist: true` output (deleting an
interrupted run's checkpoint), and a stage with a persist output never uses the run-cache. So
resume state lives outside every DVC output, in `.fcn-resume/<stage>/<fingerprint>/` at the
repository root (`resume_root`), which a queued experiment's temporary copy finds too. The
fingerprint covers exactly what decides the stage's result (`RunInputs`): the params keys the
stage declares in dvc.yaml, the digest of the model or weights it starts from and of the data.
A rerun resumes only from a checkpoint with the same fingerprint and otherwise says which
inputs changed. Data order and augmentation derive from (seed, epoch, index), each rank's RNG
state is saved with the checkpoint, and the DVCLive history is replayed from it: a killed run
that resumes ends with the same weights and the same logs as an uninterrupted one (fp32 on CPU).

Loss normalisation is global: per-pixel losses are summed and divided by the number of valid
pixels in the whole optimiser step (all micro-batches, all ranks), so gradient accumulation
and DDP give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.config import architecture

# re-exported: benchmarks and older callers import them from here
from pipeline.device import (  # noqa: F401
    autocast,
    cpu_supports_bf16,
    grad_scaler,
    resolve_device,
    resolve_precision,
)

CHECKPOINT_NAME = "last.pt"
INPUTS_NAME = "inputs.json"
RESUME_DIR_NAME = ".fcn-resume"
RESUME_DIR_ENV = "FCN_RESUME_DIR"
PROJECT_DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
# Per-step losses stay on the device and are read back (and checked for NaN/inf) every this
# many steps: a read-back per step stalls the GPU queue on every iteration.
LOSS_READBACK_EVERY = 20


# --- processes: a trainer never outlives its launcher, two never share a stage ----------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have Linux send `sig` to this process the moment its parent dies (prctl
    PR_SET_PDEATHSIG). Returns False where that is not available (not Linux).

    A killed `dvc` otherwise leaves its stage running: the orphan keeps writing the outputs and
    logs that the rerun writes too. The setting survives `execv` (the torchrun relaunch) and is
    set again by each rank and each loader worker for their own parents.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _loader_worker_init(worker_id: int, trainer_pid: int) -> None:
    """DataLoader worker start: die with the trainer (even if it is SIGKILLed)."""
    die_with_parent()
    if os.getppid() != trainer_pid:  # the trainer died before the line above took effect
        os._exit(1)


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock; the message names its pid."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block; the file records
    the holder's pid. The kernel drops the lock when the holder dies, even by SIGKILL.

    Raises:
        StageBusyError: another live process holds it; the message names its pid and the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StageBusyError(
                f"{what} is already running in process {holder} (lock {path}); "
                f"wait for it to finish or stop it (kill {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# --- distributed -----------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, that can start mid-epoch.

    Rank r takes positions r, r+W, r+2W, ... of the permutation (padded by wrapping so every
    rank gets the same count), so the union of the ranks' first k batches is exactly the first
    k global batches of the single-process order. It yields (epoch, index) keys: the dataset
    seeds a sample's augmentation from the key's epoch (`SegmentationShards.__getitem__`), so
    one loader with persistent workers serves every epoch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.skip = 0  # samples of this rank to skip (resume mid-epoch)
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.world
        perm = (perm * math.ceil(total / self.n))[:total]
        return perm[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.order()[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


# --- optimiser and loss (the paper's recipe) -------------------------------------------------


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, score_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Weights: lr with weight decay; biases: twice the lr and no decay (as in the FCN solver).

    The class-score layers (`pipeline.models.surgery.is_score_layer`: the zero-initialised
    `score_fr`, `score_pool4`, `score_pool3`) learn at `score_lr_mult` times that. The FCN
    release uses 1 (every layer's `lr_mult` is 1, 2 for biases); a larger factor for the
    layers that start from nothing is the usual fine-tuning practice (DeepLab's prototxt:
    `lr_mult: 10` on its new classifier). Each group carries its `lr_mult`, which `set_lr`
    applies. Frozen parameters (the fixed final bilinear upsampling) are left out.
    """
    from pipeline.models.surgery import is_score_layer

    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_score_layer(name), name.endswith("bias")), []).append(p)
    out = []
    for (score, bias), params in sorted(groups.items()):
        mult = (score_lr_mult if score else 1.0) * (2.0 if bias else 1.0)
        out.append(
            {
                "params": params,
                "lr": mult * lr,
                "weight_decay": 0.0 if bias else weight_decay,
                "name": ("score_" if score else "") + ("biases" if bias else "weights"),
                "lr_mult": mult,
            }
        )
    return out


def sgd_implementation(device: torch.device) -> dict[str, bool]:
    """The SGD kernel flags for parameters on `device`: `fused` (one kernel for all the
    parameters' updates) on CUDA, `foreach` (multi-tensor ops, one per group instead of one per
    parameter) elsewhere. Same update as the per-parameter loop, fewer kernel launches."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device | None = None,
    score_lr_mult: float = 1.0,
) -> torch.optim.SGD:
    """SGD with momentum over `param_groups` (the FCN solver's lr_mult/decay_mult 1/1, 2/0; the
    score layers at `score_lr_mult` times the rate), with the fast kernels of
    `sgd_implementation` for `device` (default: the device of the model's first parameter, CPU
    for a model without any). Call it after moving the model."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.optim.SGD(
        param_groups(model, lr, weight_decay, score_lr_mult),
        lr=lr,
        momentum=momentum,
        **sgd_implementation(device),
    )


def use_sgd_implementation(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Set `sgd_implementation(device)` on every group, in place: `load_state_dict` restores
    the flags a checkpoint was saved with (an older checkpoint: none; another device: the
    other kernel, and a fused update needs its parameters on a supported device)."""
    flags = {"foreach": None, "fused": None, **sgd_implementation(device)}
    for group in optimizer.param_groups:
        group.update(flags)


def lr_factor(policy: str, step: int, total_steps: int, power: float = 0.9) -> float:
    """`fixed`: the paper's constant rate. `poly`: (1 - step/total)^0.9, which settles a short
    run at its end instead of leaving it bouncing at the full rate."""
    if policy == "fixed":
        return 1.0
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def iteration_budget(stage: Mapping[str, Any], steps_per_epoch: int) -> tuple[int, int]:
    """(iterations, epochs) of one stage's training: `max_iter` iterations when it is set, the
    epochs derived (ceil; the last one cut short), else `epochs` full epochs of
    `steps_per_epoch` optimiser steps each. The paper's solvers count iterations (Caffe's
    `max_iter`), which keeps a recipe's meaning whatever the size of the training set.

    Raises:
        ValueError: `steps_per_epoch` < 1.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    max_iter = stage.get("max_iter")
    if max_iter is None:
        return steps_per_epoch * stage["epochs"], stage["epochs"]
    return max_iter, math.ceil(max_iter / steps_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its `lr_mult` (`param_groups`: biases 2x, score layers more)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def summed_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the valid pixels (255 ignored), computed in fp32.

    logits: [N, C, H, W] float (any precision); target: [N, H, W] int64. Returns a 0-d fp32.
    """
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


def step_normaliser(
    targets: list[torch.Tensor], loss: str, world: int, device: torch.device | None = None
) -> float:
    """What the step's summed loss is divided by, so that DDP's gradient mean over `world`
    ranks and accumulation over micro-batches equal one big batch.

    targets: this rank's label maps of the step, one [N, H, W] int64 tensor per micro-batch.
    `mean`: the number of valid pixels in the whole global step (the per-pixel normalised loss
    used with lr ~1e-4..1e-2). `sum`: the number of images in the global step, so the update is
    the per-image summed loss averaged over batch, accumulation and ranks, whatever their sizes:
    the Caffe solver's semantics (`normalize: false` divides by the batch, `iter_size` and the
    number of solvers divide the gradient), for which the paper's lr 1e-10 was set.

    The count is all-reduced on `device` (the process group's device: NCCL takes CUDA tensors
    only). Every rank gets the same number of images per step (`EpochSampler` pads), so DDP's
    mean over ranks turns the local image count into the global one.
    """
    if loss == "sum":
        return float(sum(t.shape[0] for t in targets))
    local = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
    valid = torch.tensor([local], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(valid)
    return max(float(valid.item()), 1.0) / world


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One micro-batch: forward under autocast, summed loss / `norm`, backward (through the
    fp16 loss scaler when one is enabled). x: [N, 3, H, W] float; y: [N, H, W] int64.

    Returns the detached 0-d loss on `device`: reading it back is left to the caller, because a
    read-back per micro-batch stalls the GPU.
    """
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x)
    loss = summed_loss(logits, y) / norm
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


# --- model construction ----------------------------------------------------------------------


def enable_fast_kernels(device: torch.device) -> None:
    """Process-wide speed settings for training on `device`. CUDA: cuDNN benchmark mode, which
    times the convolution algorithms once per input shape and keeps the fastest: training crops
    have one fixed size (`train.crop_size`), so that search is paid once per run. (Validation
    at original resolution sees many shapes and turns it off: `cudnn_benchmark`.) Nothing on
    other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN benchmark mode set to `enabled` for the block, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def training_module(
    model: nn.Module, tcfg: dict[str, Any], device: torch.device, distributed: bool
) -> nn.Module:
    """What the training step calls: `model` itself, wrapped in DDP when `distributed`, then in
    `torch.compile` when `train.compile` is true (compiled lazily, at the first step).

    Only the step goes through the wrapper: checkpoints, validation and the saved model use
    `model`, whose state-dict keys stay those of the plain module.
    """
    module = model
    if distributed:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tcfg.get("compile", False):
        module = torch.compile(module)
    return module


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
    from pipeline.models.fcn import build_model, load_model
    from pipeline.models.surgery import init_random, load_vgg16_backbone, transplant

    torch.manual_seed(seed)
    model = build_model(name, num_classes=NUM_CLASSES, width=width)
    if init_from is not None:  # FCN-16s from FCN-32s, FCN-8s from FCN-16s
        src = load_model(init_from, map_location="cpu")
        copied = transplant(src, model)
        return model, [f"transplanted {len(copied)} tensors from {init_from}"]
    init_random(model, seed)
    if backbone_init == "vgg16":
        if vgg16_path is None:
            raise ValueError("backbone_init 'vgg16' needs the VGG16 weights file")
        try:
            state = torch.load(vgg16_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{vgg16_path}: not a loadable VGG16 state dict ({e})") from None
        load_vgg16_backbone(model, state, source=str(vgg16_path))
        return model, [f"VGG16 backbone from {vgg16_path}"]
    return model, ["random initialisation"]


# --- what decides a stage's result: the fingerprint -------------------------------------------


def file_digest(path: Path | None, chunk: int = 1 << 20) -> str | None:
    """md5 of a file's bytes, None for None."""
    if path is None:
        return None
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def declared_params(stage: str, dvc_yaml: Path = PROJECT_DVC_YAML) -> list[str]:
    """The params keys `stage` declares in dvc.yaml, as written there (`${profile}.train.lr`).

    dvc.yaml is the one list: DVC re-runs the stage when one of these changes, and a resume
    state is reused only while none of them has changed.

    Raises:
        ValueError: dvc.yaml has no such stage, or it declares no params.
    """
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise ValueError(f"{dvc_yaml}: no stage {stage!r}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params-file: [keys]}
            for file, file_keys in entry.items():
                if Path(file).name == "params.yaml":
                    keys.extend(file_keys or [])
    if not keys:
        raise ValueError(f"{dvc_yaml}: stage {stage!r} declares no params")
    return keys


def resolve_params(keys: list[str], cfg: dict[str, Any]) -> dict[str, Any]:
    """{full dotted key: value} of the declared `keys` in `cfg` (the active profile's section
    plus `profile`), `${profile}` resolved; a key naming a section becomes one entry per leaf
    (`sample.train.fcn32s` -> `sample.train.fcn32s.lr`, `.epochs`), so a change names its key.

    Raises:
        KeyError: a key is not in the active profile.
    """
    profile = cfg["profile"]
    flat: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            flat[key] = value

    for raw in keys:
        key = raw.replace("${profile}", profile)
        parts = key.split(".")
        if parts == ["profile"]:
            add(key, profile)
            continue
        if parts[0] != profile:
            raise KeyError(f"{raw}: not a key of the active profile {profile!r}")
        node: Any = cfg
        for i, part in enumerate(parts[1:], start=1):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{raw}: {'.'.join(parts[: i + 1])} is not in params")
            node = node[part]
        add(key, node)
    return flat


@dataclass(frozen=True)
class RunInputs:
    """Everything that decides a training stage's result, and nothing else.

    Not in it, because they cannot change the result: `workers` (augmentation is seeded per
    sample, not per worker), the checkpoint cadence, the progress bar, other stages' keys.
    """

    stage: str
    params: dict[str, Any]  # declared key -> value (leaves)
    init: str | None  # md5 of the model or VGG16 weights the stage starts from
    data: dict[str, str | None]  # md5 of the train and val shard indexes

    @classmethod
    def of_stage(
        cls,
        name: str,
        cfg: dict[str, Any],
        *,
        init_path: Path | None,
        train_dir: Path,
        val_dir: Path,
        dvc_yaml: Path = PROJECT_DVC_YAML,
    ) -> RunInputs:
        """The inputs of `train_<name>` as dvc.yaml declares them."""
        from pipeline.data.shards import INDEX_NAME

        return cls(
            stage=name,
            params=resolve_params(declared_params(f"train_{name}", dvc_yaml), cfg),
            init=file_digest(init_path),
            data={
                "train": file_digest(Path(train_dir) / INDEX_NAME),
                "val": file_digest(Path(val_dir) / INDEX_NAME),
            },
        )

    def fingerprint(self) -> str:
        return fingerprint(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": self.params, "init": self.init, "data": self.data}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunInputs:
        return cls(obj["stage"], dict(obj["params"]), obj["init"], dict(obj["data"]))

    def differences(self, other: RunInputs) -> list[str]:
        """What changed from `other` to self, one item per key (`key: old -> new`)."""
        out = []
        for key in sorted(self.params.keys() | other.params.keys()):
            old, new = other.params.get(key, "(absent)"), self.params.get(key, "(absent)")
            if old != new:
                out.append(f"{key}: {old} -> {new}")
        if self.init != other.init:
            out.append("the initial model (its file changed)")
        for split in sorted(self.data.keys() | other.data.keys()):
            if self.data.get(split) != other.data.get(split):
                out.append(f"the {split} data (data/preprocessed/{split} changed)")
        return out


# --- resume state: where it lives, what it holds -----------------------------------------------


def resume_root(cwd: Path | None = None, environ: dict[str, str] | None = None) -> Path:
    """The folder that holds every stage's resume state: `<repository root>/.fcn-resume`.

    Outside every DVC output, so DVC neither deletes it (`dvc exp run` checks outputs out
    before running) nor caches it; git- and dvc-ignored. The repository root is the first of:
    `$FCN_RESUME_DIR` (the resume folder itself, e.g. on a bigger disk); `$DVC_ROOT`, which
    DVC sets for stage commands to the main repository even when a queued experiment runs in
    a temporary copy; a working directory under `<repo>/.dvc/tmp/exps/` (that temporary copy,
    when run by hand) maps to `<repo>`; else the working directory.
    """
    env = os.environ if environ is None else environ
    if env.get(RESUME_DIR_ENV):
        return Path(env[RESUME_DIR_ENV]).resolve()
    base = Path(env["DVC_ROOT"]) if env.get("DVC_ROOT") else Path(cwd or os.getcwd())
    parts = base.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / RESUME_DIR_NAME
    return base.resolve() / RESUME_DIR_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a kill leaves the previous one or this one, whole."""
    # into an open file: given a path, torch names the zip root after the random temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None if there is none, it is unreadable (torn,
    pickles code: weights-only loading refuses it) or it belongs to other inputs."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: never trust it, start over
        print(f"[train] ignoring unreadable checkpoint {path}: {e}", flush=True)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        print(f"[train] {path} belongs to other params/data; starting from scratch", flush=True)
        return None
    return state


@dataclass
class ResumeState:
    """What a checkpoint holds: enough to continue as if never interrupted."""

    fingerprint: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int  # epochs completed
    iteration: int  # optimiser steps completed
    history: list[dict[str, float]]  # one entry per completed epoch: what DVCLive logged
    epoch_losses: list[float]  # the current epoch's step losses so far
    scores: dict[str, Any]  # the latest validation scores
    rng: list[dict[str, Any]]  # each rank's RNG state, by rank

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResumeState:
        """Raises KeyError for a checkpoint that lacks a field (an older format)."""
        return cls(**{f.name: d[f.name] for f in fields(cls)})


class ResumeStore:
    """One stage's resume state for one set of inputs, under the stage's resume folder:

        <stage_dir>/<fingerprint[:16]>/last.pt      the latest checkpoint
        <stage_dir>/<fingerprint[:16]>/inputs.json  the `RunInputs` it belongs to
        <stage_dir>/<fingerprint[:16]>.lock         held while a run of these inputs is alive

    Runs of other inputs keep their own folders (so going back to earlier params resumes
    too, and parallel queued experiments do not collide); a completed run removes its folder.
    """

    def __init__(self, stage_dir: Path, inputs: RunInputs):
        self.stage_dir, self.inputs = Path(stage_dir), inputs
        self.fingerprint = inputs.fingerprint()
        self.slot = self.stage_dir / self.fingerprint[:16]
        self.checkpoint_path = self.slot / CHECKPOINT_NAME

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive for the run's lifetime (see `exclusive_lock`)."""
        return exclusive_lock(
            self.stage_dir / f"{self.fingerprint[:16]}.lock", f"train_{self.inputs.stage}"
        )

    def load(self) -> ResumeState | None:
        """This run's resume state, if an earlier run of the same inputs left one."""
        state = load_checkpoint(self.checkpoint_path, self.fingerprint)
        if state is None:
            return None
        try:
            return ResumeState.from_dict(state)
        except (KeyError, TypeError) as e:
            print(f"[train] ignoring checkpoint {self.checkpoint_path} of an older format ({e})")
            return None

    def save(self, state: ResumeState) -> None:
        if not (self.slot / INPUTS_NAME).exists():
            atomic_write_json(self.slot / INPUTS_NAME, self.inputs.to_json())
        save_checkpoint(self.checkpoint_path, state.to_dict())

    def others(self) -> list[tuple[Path, RunInputs | None]]:
        """Resume states of other inputs for this stage, newest first."""
        found = []
        for ckpt in self.stage_dir.glob(f"*/{CHECKPOINT_NAME}"):
            if ckpt.parent == self.slot:
                continue
            try:
                inputs = RunInputs.from_json(json.loads((ckpt.parent / INPUTS_NAME).read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                inputs = None
            found.append((ckpt.stat().st_mtime, ckpt.parent, inputs))
        return [(slot, inputs) for _, slot, inputs in sorted(found, reverse=True)]

    def why_not_resumed(self) -> list[str]:
        """For a fresh start: which interrupted runs of this stage are not resumed, and why."""
        lines = []
        for slot, inputs in self.others():
            size = sum(p.stat().st_size for p in slot.iterdir() if p.is_file()) / 2**20
            why = "; ".join(self.inputs.differences(inputs)) if inputs else "unknown inputs"
            lines.append(
                f"not resuming the interrupted run in {slot}: its inputs differ ({why}). "
                f"It is kept and resumes if they come back ({size:.1f} MiB; rm -rf it to free)"
            )
        return lines

    def finish(self) -> None:
        """The run completed: its resume state is spent."""
        shutil.rmtree(self.slot, ignore_errors=True)


class CheckpointCadence:
    """When to save: every `every_iterations` steps, and at least every `every_minutes` of
    wall time (a full-width checkpoint is ~1 GB: a fixed step count is seconds of work on a
    fast GPU and hours on a CPU). `clock` is injectable for tests; monotonic by default."""

    def __init__(
        self,
        every_iterations: int,
        every_minutes: float | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every_iterations, self.every_minutes, self.clock = (
            every_iterations,
            every_minutes,
            clock,
        )
        self.last = clock()

    def due_by_iteration(self, iteration: int) -> bool:
        return iteration % self.every_iterations == 0

    def due_by_time(self) -> bool:
        return self.every_minutes is not None and (
            self.clock() - self.last >= 60.0 * self.every_minutes
        )

    def saved(self) -> None:
        self.last = self.clock()


# --- per-rank randomness -------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch RNG state (CPU and every CUDA device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, by rank (a collective: all ranks call it at the same step)."""
    mine = rng_state()
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


# --- validation ------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Mean IoU etc. on the val set at original resolution (each rank scores a slice; the
    confusion matrix is summed on `device`, the process group's device)."""
    from pipeline.evaluation.metrics import confusion_matrix, segmentation_scores

    was_training = model.training
    model.eval()
    hist = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    # images at original resolution: nearly every one is a new shape to benchmark
    with cudnn_benchmark(False):
        for i in range(rank, len(dataset), world):
            image, mask = dataset[i]
            x = image.unsqueeze(0).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                logits = model(x)
            target = mask.unsqueeze(0).to(device)
            hist += confusion_matrix(logits.argmax(1), target, NUM_CLASSES)
    if world > 1:
        dist.all_reduce(hist)
    model.train(was_training)
    return segmentation_scores(hist.cpu())


# --- the loop's parts ------------------------------------------------------------------------


def make_loader(
    train_set, sampler: EpochSampler, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """The stage's loader: `sampler` decides each epoch's order (`set_epoch` before iterating
    again); its workers start once and stay for every epoch (`persistent_workers`: an epoch of
    a few hundred images would otherwise pay their start-up each time), and die with the
    trainer.

    It draws its workers' base seed from a generator of its own: from the global RNG (the
    default), a run resumed mid-epoch would draw it once more than the uninterrupted run at
    that point and then drop other units (the restored RNG state moved on). Augmentation is
    seeded per sample, so the workers' seed changes nothing else.
    """
    return DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=functools.partial(_loader_worker_init, trainer_pid=os.getpid()),
        generator=torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.epoch),
        persistent_workers=workers > 0,
    )


def micro_batches(
    loader: DataLoader, accumulate: int, steps: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Up to `steps` optimiser steps of `accumulate` micro-batches (the last may be short)."""
    it = iter(loader)
    for _ in range(steps):
        micro = list(zip(range(accumulate), it, strict=False))
        if not micro:
            return
        yield [batch for _, batch in micro]


@dataclass
class StepContext:
    """What one optimiser step needs besides the batches."""

    model: nn.Module  # `training_module`: the DDP and/or torch.compile wrapper, or the model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    loss: str  # mean | sum
    world: int
    distributed: bool


def train_one_step(
    ctx: StepContext, micro: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Zero the gradients, forward/backward each micro-batch (DDP syncs on the last one only),
    step. Returns this rank's step loss, detached, on the device (not read back)."""
    norm = step_normaliser([t for _, t in micro], ctx.loss, ctx.world, ctx.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=ctx.device)
    for k, (x, y) in enumerate(micro):
        last = k == len(micro) - 1
        sync = ctx.model.no_sync() if ctx.distributed and not last else contextlib.nullcontext()
        with sync:
            step_loss += forward_backward(
                ctx.model, x, y, norm, ctx.device, ctx.amp_dtype, ctx.channels_last, ctx.scaler
            )
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    return step_loss


@dataclass
class LossReadback:
    """Step losses kept on the device, read back in blocks (`LOSS_READBACK_EVERY` steps),
    averaged over ranks and checked for NaN/inf there."""

    name: str
    loss_kind: str
    world: int
    pending: list[torch.Tensor] = field(default_factory=list)
    first_iteration: int = 0  # iteration number of pending[0]

    def add(self, loss: torch.Tensor, iteration: int) -> None:
        if not self.pending:
            self.first_iteration = iteration
        self.pending.append(loss)

    def flush(self) -> list[float]:
        """The pending step losses as floats (rank mean).

        Raises:
            FloatingPointError: a step's loss is NaN or infinite; names the iteration and the
                lr to lower.
        """
        if not self.pending:
            return []
        values = torch.stack(self.pending).double()
        if self.world > 1:  # a rank's loss is its share x world: the mean over ranks is exact
            dist.all_reduce(values)
            values /= self.world
        out = values.tolist()
        self.pending = []
        for i, v in enumerate(out):
            if not math.isfinite(v):
                raise FloatingPointError(
                    f"{self.name}: loss is {v} at iteration {self.first_iteration + i}; lower "
                    f"train.{self.name}.lr (loss '{self.loss_kind}' wants "
                    f"{'~1e-10' if self.loss_kind == 'sum' else '~1e-4..1e-2'})"
                )
        return out


def open_live(live_dir: Path | None, history: list[dict[str, float]]):
    """A DVCLive logger with the interrupted run's epochs replayed (None for no logging)."""
    if live_dir is None:
        return None
    from dvclive import Live

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
    for entry in history:
        log_history(live, entry)
    return live


def log_history(live, entry: dict[str, float]) -> None:
    """One epoch's entry as one DVCLive step."""
    if live is None:
        return
    for k, v in entry.items():
        live.log_metric(k, v)
    live.next_step()


def epoch_entry(
    epoch: int, epoch_losses: list[float], lr: float, iteration: int
) -> dict[str, float]:
    """One logged point: the mean of `epoch_losses` (the step losses it covers:
    `since_last_entry`), the last lr, the epoch's number (1-based) and the iterations done."""
    return {
        "train/loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
        "lr": lr,
        "epoch": epoch + 1,
        "iteration": iteration,
    }


def since_last_entry(
    epoch_losses: list[float], history: list[dict[str, float]], epoch_start: int
) -> list[float]:
    """The step losses of this epoch (`epoch_losses`, one per iteration from `epoch_start`)
    after the last logged point: a logged loss covers the steps since the previous one (the
    whole epoch when points are only logged at epoch ends). Derived from `history`, so a
    resumed run logs the same values."""
    last = history[-1].get("iteration", 0) if history else 0
    return epoch_losses[max(0, last - epoch_start) :]


def validation_due(iteration: int, epoch_end: int, val_every_iter: int | None) -> bool:
    """Whether to validate inside an epoch after `iteration` steps: every `val_every_iter`
    iterations (None: never), except at the epoch's last step (`epoch_end`), whose own entry
    follows. With epochs of 100k+ images (COCO), epoch-end validation alone shows nothing for
    hours."""
    return val_every_iter is not None and iteration % val_every_iter == 0 and iteration < epoch_end


def check_same_start(iteration: int, store: ResumeStore, device: torch.device, world: int) -> None:
    """Every rank must start from the same iteration (a collective under DDP; nothing alone).
    Each rank reads the checkpoint from its own disk: on several machines, a resume folder
    that is not shared leaves the other nodes' ranks at 0 while node 0 resumes.

    Raises:
        RuntimeError: the ranks found different checkpoints (on every rank, so none hangs).
    """
    if world == 1:
        return
    lo = torch.tensor([iteration], dtype=torch.int64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo.item()) != int(hi.item()):
        raise RuntimeError(
            f"ranks found different resume states in {store.checkpoint_path} (iterations "
            f"{int(lo.item())} to {int(hi.item())}): on several machines, set {RESUME_DIR_ENV} "
            "to a folder shared by all of them, or remove the resume state to start over"
        )


def start_or_resume(
    name: str,
    cfg: dict[str, Any],
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
    """
    tcfg, mcfg = cfg["train"], cfg["model"]
    rank, world = dist_info()
    state = store.load()
    check_same_start(state.iteration if state is not None else 0, store, device, world)
    model, init_log = build_initial_model(
        architecture(name, cfg["train"]),
        width=mcfg["width"],
        backbone_init=mcfg["backbone_init"],
        vgg16_path=vgg16_path,
        init_from=init_from,
        seed=tcfg["seed"],
    )
    set_dropout(model, mcfg["dropout"])
    model.to(device)
    if tcfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        model,
        tcfg[name]["lr"],
        tcfg["momentum"],
        tcfg["weight_decay"],
        device,
        score_lr_mult=tcfg.get("score_lr_mult", 1.0),
    )
    torch.manual_seed(tcfg["seed"] + rank)
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        use_sgd_implementation(optimizer, device)
        set_rng_state(state.rng[rank])
        say(
            f"[train] {name}: resuming from {store.checkpoint_path} at iteration {state.iteration}",
            flush=True,
        )
        return model, optimizer, state
    for line in store.why_not_resumed():
        say(f"[train] {name}: {line}", flush=True)
    say(f"[train] {name}: {'; '.join(init_log)}", flush=True)
    fresh = ResumeState(
        fingerprint=store.fingerprint,
        model={},
        optimizer={},
        epoch=0,
        iteration=0,
        history=[],
        epoch_losses=[],
        scores={},
        rng=[],
    )
    return model, optimizer, fresh


# --- the loop --------------------------------------------------------------------------------


def train(
    name: str,
    cfg: dict[str, Any],
    *,
    train_dir: Path,
    val_dir: Path,
    out_model: Path,
    resume_dir: Path,
    live_dir: Path | None,
    vgg16_path: Path | None = None,
    init_from: Path | None = None,
    progress: bool = True,
    dvc_yaml: Path = PROJECT_DVC_YAML,
) -> dict[str, Any]:
    """Train one FCN stage with `cfg` (the active params profile) and write `out_model`.

    `resume_dir` is the stage's resume folder (`resume_root() / name` for the DVC stage); an
    interrupted run with the same `RunInputs` is continued from there. Returns
    {"iterations", "history", "scores"}; "scores" are the last validation's.

    Raises:
        StageBusyError: a live run of the same stage and inputs holds the lock.
        FloatingPointError: the loss became NaN or infinite.
        ValueError: the training set is empty, or the VGG16 weights are unusable.
    """
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform, train_transform

    tcfg = cfg["train"]
    device = resolve_device(tcfg["device"])
    distributed = init_distributed(device)
    rank, world = dist_info()
    train_set = SegmentationShards(
        train_dir,
        transform=train_transform(
            tcfg["crop_size"], tuple(tcfg["scale_range"]), tcfg["hflip"], tcfg["color_jitter"]
        ),
        seed=tcfg["seed"],
    )
    val_set = SegmentationShards(val_dir, transform=eval_transform())
    if len(train_set) == 0:
        raise ValueError(f"{train_dir}: the training set is empty")
    init_path = init_from if init_from is not None else vgg16_path
    inputs = RunInputs.of_stage(
        name, cfg, init_path=init_path, train_dir=train_dir, val_dir=val_dir, dvc_yaml=dvc_yaml
    )
    store = ResumeStore(Path(resume_dir), inputs)
    with store.lock() if rank == 0 else contextlib.nullcontext():
        result = _train_stage(
            name,
            cfg,
            store,
            train_set,
            val_set,
            out_model=out_model,
            live_dir=live_dir,
            vgg16_path=vgg16_path,
            init_from=init_from,
            progress=progress,
            device=device,
            distributed=distributed,
        )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _train_stage(
    name: str,
    cfg: dict[str, Any],
    store: ResumeStore,
    train_set,
    val_set,
    *,
    out_model: Path,
    live_dir: Path | None,
    vgg16_path: Path | None,
    init_from: Path | None,
    progress: bool,
    device: torch.device,
    distributed: bool,
) -> dict[str, Any]:
    """The recipe, with the lock held: resume or initialise, epochs of steps with checkpoints
    and validation, the model file."""
    from tqdm import tqdm

    from pipeline.models.fcn import save_model

    tcfg, stage = cfg["train"], cfg["train"][name]
    rank, world = dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    amp_dtype = resolve_precision(tcfg["precision"], device)
    if amp_dtype is None and device.type == "cpu":
        # bit-exact CPU runs (resume and DDP equivalence rely on it)
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed = tcfg["seed"]
    model, optimizer, state = start_or_resume(
        name, cfg, store, vgg16_path=vgg16_path, init_from=init_from, device=device, say=say
    )

    enable_fast_kernels(device)
    ctx = StepContext(
        model=training_module(model, tcfg, device, distributed),
        optimizer=optimizer,
        scaler=grad_scaler(device, amp_dtype),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=tcfg["channels_last"],
        loss=tcfg["loss"],
        world=world,
        distributed=distributed,
    )
    sampler = EpochSampler(len(train_set), seed, rank, world)
    batch, accumulate = tcfg["batch_size"], tcfg["accumulate"]
    steps_per_epoch = math.ceil(sampler.per_rank / (batch * accumulate))
    total_steps, epochs = iteration_budget(stage, steps_per_epoch)
    cadence = CheckpointCadence(tcfg["checkpoint_every"], tcfg.get("checkpoint_minutes"))
    readback = LossReadback(name, tcfg["loss"], world)
    live = open_live(live_dir, state.history) if rank == 0 else None

    def checkpoint() -> None:
        """Save `state` with the current weights (every rank joins: the RNG gather)."""
        state.epoch_losses.extend(readback.flush())
        rng = gather_rng_states(world)
        if rank == 0:
            state.model, state.optimizer, state.rng = (
                model.state_dict(),
                optimizer.state_dict(),
                rng,
            )
            store.save(state)
        cadence.saved()

    def time_is_due() -> bool:
        """Rank 0's clock decides for all ranks (checked at read-back points under DDP)."""
        due = cadence.due_by_time()
        if world == 1:
            return due
        flag = torch.tensor([1 if due and rank == 0 else 0], device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def score(entry: dict[str, float]) -> dict[str, float]:
        """Validate now (every rank joins) and add the scores to `entry`."""
        state.scores = validate(
            model, val_set, device, amp_dtype, tcfg["channels_last"], rank, world
        )
        entry["val/mean_iou"] = state.scores["mean_iou"]
        entry["val/pixel_accuracy"] = state.scores["pixel_accuracy"]
        return entry

    bar = tqdm(
        total=total_steps,
        initial=state.iteration,
        desc=f"train {name}",
        unit="it",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,  # logs (dvc repro | tee) stay short
    )
    # the rate of the last step taken: what an epoch that resumes at its very end logs
    lr_now = stage["lr"] * lr_factor(tcfg["lr_policy"], max(state.iteration - 1, 0), total_steps)
    t0, start_iteration = time.time(), state.iteration
    loader = make_loader(train_set, sampler, batch, tcfg["workers"], device)
    for epoch in range(state.epoch, epochs):
        epoch_start = epoch * steps_per_epoch  # iterations before this epoch
        first_step = state.iteration - epoch_start
        if first_step == 0:
            state.epoch_losses = []
        sampler.set_epoch(epoch, skip=first_step * batch * accumulate)
        model.train()
        steps = min(steps_per_epoch, total_steps - epoch_start)  # max_iter cuts the last
        epoch_end = epoch_start + steps
        for micro in micro_batches(loader, accumulate, steps - first_step):
            lr_now = stage["lr"] * lr_factor(tcfg["lr_policy"], state.iteration, total_steps)
            set_lr(optimizer, lr_now)
            readback.add(train_one_step(ctx, micro), state.iteration)
            state.iteration += 1
            bar.update(1)
            readback_due = len(readback.pending) >= LOSS_READBACK_EVERY
            if readback_due:
                state.epoch_losses.extend(readback.flush())
                bar.set_postfix(epoch=epoch + 1, loss=f"{state.epoch_losses[-1]:.4g}")
            due = cadence.due_by_iteration(state.iteration) or (
                (world == 1 or readback_due) and time_is_due()
            )
            if validation_due(state.iteration, epoch_end, tcfg.get("val_every_iter")):
                state.epoch_losses.extend(readback.flush())
                losses = since_last_entry(state.epoch_losses, state.history, epoch_start)
                entry = epoch_entry(epoch, losses, lr_now, state.iteration)
                state.history.append(score(entry))
                log_history(live, entry)
            if due and state.iteration < total_steps:
                checkpoint()
        state.epoch_losses.extend(readback.flush())
        losses = since_last_entry(state.epoch_losses, state.history, epoch_start)
        entry = epoch_entry(epoch, losses, lr_now, state.iteration)
        if (epoch + 1) % tcfg["val_every"] == 0 or epoch + 1 == epochs:
            score(entry)
        state.history.append(entry)
        log_history(live, entry)
        if progress:
            msg = ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "epoch")
            say(f"[train] {name} epoch {epoch + 1}/{epochs}: {msg}", flush=True)
        state.epoch, state.epoch_losses = epoch + 1, []
        checkpoint()
    bar.close()
    del loader  # its workers end here

    if rank == 0:
        save_model(out_model, model, trained_iterations=state.iteration)
        trained = state.iteration - start_iteration
        say(
            f"[train] {name}: {state.iteration} iterations ({trained} in this run) in "
            f"{time.time() - t0:.1f} s",
            flush=True,
        )
        if live is not None:
            live.end()
        store.finish()
    return {"iterations": state.iteration, "history": state.history, "scores": state.scores}
