"""Training loop for FCN-32s -> FCN-16s -> FCN-8s: staged, resumable, DDP-ready, seeded.

One `train()` call trains one stage of the paper's cascade:
- FCN-32s starts from ImageNet VGG16 (fc6/fc7 reshaped into convolutions) or at random;
- FCN-16s and FCN-8s start from the previous stage's model, transplanted layer by layer.

Resumption: DVC 3 has no built-in checkpoints, so checkpoints live in a `persist: true`
output (`checkpoints/<name>/`). A checkpoint carries a fingerprint of everything that
determines the result (params, init model, data index); a rerun resumes only from a checkpoint
with the same fingerprint, so a param change never continues a stale run. Data order and
augmentation derive from (seed, epoch, index), the global RNG state is saved with the
checkpoint, and the DVCLive history is replayed from it: a killed run that resumes ends with
the same weights and the same logs as an uninterrupted one (fp32 on CPU).

Loss normalisation is global: per-pixel losses are summed and divided by the number of valid
pixels in the whole optimiser step (all micro-batches, all ranks), so gradient accumulation
and DDP give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES

CHECKPOINT_NAME = "last.pt"
COMPLETE_NAME = "complete.json"


# --- devices and precision -------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested in params but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX)."""
    with contextlib.suppress(Exception):
        return bool(torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- distributed -----------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
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
    k global batches of the single-process order.
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

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


# --- optimiser and loss (the paper's recipe) -------------------------------------------------


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Weights: lr with weight decay; biases: twice the lr and no decay (as in the FCN solver).

    Frozen parameters (the fixed final bilinear upsampling) are left out.
    """
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    return [
        {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "name": "biases"},
    ]


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(param_groups(model, lr, weight_decay), lr=lr, momentum=momentum)


def lr_factor(policy: str, step: int, total_steps: int, power: float = 0.9) -> float:
    """`fixed`: the paper's constant rate. `poly`: (1 - step/total)^0.9, which settles a short
    run at its end instead of leaving it bouncing at the full rate."""
    if policy == "fixed":
        return 1.0
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 2 * lr if group.get("name") == "biases" else lr


def summed_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the valid pixels (255 ignored), computed in fp32."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


def step_normaliser(targets: list[torch.Tensor], loss: str, world: int) -> float:
    """What the step's summed loss is divided by, so that DDP's gradient mean over `world`
    ranks and accumulation over micro-batches equal one big batch.

    `mean`: the number of valid pixels in the whole global step (the per-pixel normalised loss
    used with lr ~1e-4..1e-2). `sum`: 1 (the original Caffe recipe: lr 1e-10, momentum 0.99).
    """
    if loss == "sum":
        return 1.0 / world
    valid = torch.tensor(
        [sum(int((t != IGNORE_INDEX).sum()) for t in targets)], dtype=torch.float64
    )
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
) -> float:
    """One micro-batch: forward under autocast, summed loss / `norm`, backward. Returns the loss."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x)
    loss = summed_loss(logits, y) / norm
    loss.backward()
    return float(loss.detach())


# --- model construction ----------------------------------------------------------------------


def set_dropout(model: nn.Module, p: float) -> None:
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
    """The model a training stage starts from, and a log of what was initialised how."""
    from pipeline.models.fcn import build_model, load_model
    from pipeline.surgery import init_random, load_vgg16_backbone, transplant

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


# --- checkpoints -----------------------------------------------------------------------------


def file_digest(path: Path | None, chunk: int = 1 << 20) -> str | None:
    if path is None:
        return None
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # into an open file: given a path, torch names the zip root after the random temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None if there is none or it belongs to another run."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: never trust it, start over
        print(f"[train] ignoring unreadable checkpoint {path}: {e}", flush=True)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        print(f"[train] {path} belongs to other params/data; starting from scratch", flush=True)
        return None
    return state


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
    """Mean IoU etc. on the val set at original resolution (each rank scores a slice)."""
    from pipeline.metrics import confusion_matrix, segmentation_scores

    was_training = model.training
    model.eval()
    hist = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    for i in range(rank, len(dataset), world):
        image, mask = dataset[i]
        x = image.unsqueeze(0).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        hist += confusion_matrix(logits.argmax(1), mask.unsqueeze(0).to(device), NUM_CLASSES)
    if world > 1:
        dist.all_reduce(hist)
    model.train(was_training)
    return segmentation_scores(hist.cpu())


# --- the loop --------------------------------------------------------------------------------


def _collect_step(it: Iterator, accumulate: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for _ in range(accumulate):
        try:
            batches.append(next(it))
        except StopIteration:
            break
    return batches


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    name: str,
    cfg: dict[str, Any],
    *,
    train_dir: Path,
    val_dir: Path,
    out_model: Path,
    checkpoint_dir: Path,
    live_dir: Path | None,
    vgg16_path: Path | None = None,
    init_from: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one FCN stage with `cfg` (the active params profile); returns the final scores."""
    from tqdm import tqdm

    from pipeline.datasets import SegmentationShards
    from pipeline.models.fcn import save_model
    from pipeline.transforms import eval_transform, train_transform

    tcfg, mcfg = cfg["train"], cfg["model"]
    stage = tcfg[name]
    device = resolve_device(tcfg["device"])
    distributed = init_distributed(device)
    rank, world = dist_info()
    amp_dtype = resolve_precision(tcfg["precision"], device)
    if amp_dtype is None and device.type == "cpu":
        # bit-exact CPU runs (resume and DDP equivalence rely on it)
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed = tcfg["seed"]

    train_set = SegmentationShards(
        train_dir,
        transform=train_transform(
            tcfg["crop_size"], tuple(tcfg["scale_range"]), tcfg["hflip"], tcfg["color_jitter"]
        ),
        seed=seed,
    )
    val_set = SegmentationShards(val_dir, transform=eval_transform())
    if len(train_set) == 0:
        raise ValueError(f"{train_dir}: the training set is empty")

    init_model_path = init_from if init_from is not None else None
    fp = fingerprint(
        {
            "name": name,
            "train": tcfg,
            "model": mcfg,
            "world": world,
            "init": file_digest(init_model_path),
            "vgg16": file_digest(vgg16_path) if init_from is None else None,
            "data": file_digest(Path(train_dir) / "index.json"),
        }
    )
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
    state = load_checkpoint(ckpt_path, fp)

    model, init_log = build_initial_model(
        name,
        width=mcfg["width"],
        backbone_init=mcfg["backbone_init"],
        vgg16_path=vgg16_path,
        init_from=init_from,
        seed=seed,
    )
    set_dropout(model, mcfg["dropout"])
    model.to(device)
    if tcfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, stage["lr"], tcfg["momentum"], tcfg["weight_decay"])

    start_epoch, start_iter, history = 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_iter, history = state["epoch"], state["iteration"], state["history"]
        _set_rng_state(state["rng"])
        if rank == 0:
            print(
                f"[train] {name}: resuming from {ckpt_path} at iteration {start_iter}", flush=True
            )
    elif rank == 0:
        print(f"[train] {name}: {'; '.join(init_log)}", flush=True)

    ddp_model = model
    if distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = EpochSampler(len(train_set), seed, rank, world)
    batch = tcfg["batch_size"]
    accumulate = tcfg["accumulate"]
    steps_per_epoch = math.ceil(sampler.per_rank / (batch * accumulate))
    epochs = stage["epochs"]
    total_steps = steps_per_epoch * epochs

    live = None
    if rank == 0 and live_dir is not None:
        from dvclive import Live

        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
        for entry in history:  # replay what the interrupted run had logged
            for k, v in entry.items():
                live.log_metric(k, v)
            live.next_step()

    iteration = start_iter
    bar = tqdm(
        total=total_steps,
        initial=iteration,
        desc=f"train {name}",
        unit="it",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,  # logs (dvc repro | tee) stay short
    )
    scores: dict[str, Any] = history[-1] if history else {}
    # a resume mid-epoch continues that epoch's losses (its train/loss is the whole epoch's)
    epoch_losses: list[float] = list(state["epoch_losses"]) if state is not None else []
    lr_now = stage["lr"] * lr_factor(tcfg["lr_policy"], iteration, total_steps)
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        first_step = iteration - epoch * steps_per_epoch
        sampler.set_epoch(epoch, skip=first_step * batch * accumulate)
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=batch,
            sampler=sampler,
            num_workers=tcfg["workers"],
            pin_memory=device.type == "cuda",
            drop_last=False,
        )
        model.train()
        it = iter(loader)
        if first_step == 0:
            epoch_losses = []
        for _ in range(first_step, steps_per_epoch):
            micro = _collect_step(it, accumulate)
            if not micro:
                break
            norm = step_normaliser([t for _, t in micro], tcfg["loss"], world)
            lr_now = stage["lr"] * lr_factor(tcfg["lr_policy"], iteration, total_steps)
            set_lr(optimizer, lr_now)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k, (x, y) in enumerate(micro):
                sync = (
                    ddp_model.no_sync()
                    if distributed and k < len(micro) - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    loss = forward_backward(
                        ddp_model, x, y, norm, device, amp_dtype, tcfg["channels_last"]
                    )
                step_loss += loss
            if world > 1:  # a rank's loss is its share x world: the mean over ranks is exact
                total = torch.tensor([step_loss], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                step_loss = float(total.item()) / world
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"{name}: loss is {step_loss} at iteration {iteration}; lower "
                    f"train.{name}.lr (loss '{tcfg['loss']}' wants "
                    f"{'~1e-10' if tcfg['loss'] == 'sum' else '~1e-4..1e-2'})"
                )
            optimizer.step()
            iteration += 1
            epoch_losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4g}", refresh=False)
            if iteration % tcfg["checkpoint_every"] == 0 and iteration < total_steps:
                _checkpoint(
                    ckpt_path,
                    rank,
                    model,
                    optimizer,
                    epoch,
                    iteration,
                    history,
                    fp,
                    epoch_losses,
                )
        # end of epoch: validate and log
        entry = {
            "train/loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
            "lr": lr_now,
            "epoch": epoch + 1,
        }
        if (epoch + 1) % tcfg["val_every"] == 0 or epoch + 1 == epochs:
            scores = validate(model, val_set, device, amp_dtype, tcfg["channels_last"], rank, world)
            entry.update(
                {
                    "val/mean_iou": scores["mean_iou"],
                    "val/pixel_accuracy": scores["pixel_accuracy"],
                }
            )
        history.append(entry)
        if live is not None:
            for k, v in entry.items():
                live.log_metric(k, v)
            live.next_step()
        if rank == 0 and progress:
            msg = ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "epoch")
            bar.write(f"[train] {name} epoch {epoch + 1}/{epochs}: {msg}")
        epoch_losses = []
        _checkpoint(ckpt_path, rank, model, optimizer, epoch + 1, iteration, history, fp, [])
    bar.close()

    if rank == 0:
        save_model(out_model, model, trained_iterations=iteration)
        print(f"[train] {name}: {iteration} iterations in {time.time() - t0:.1f} s", flush=True)
        finish_checkpoints(Path(checkpoint_dir), fp, iteration)
        if live is not None:
            live.end()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return {"iterations": iteration, "history": history, "scores": scores}


def finish_checkpoints(checkpoint_dir: Path, fp: str, iteration: int) -> None:
    """After a successful run the resume state is spent: replace it by a small marker.

    The checkpoint folder stays a (persist) DVC output, but a few bytes instead of a model plus
    momentum buffers (1 GB at full width), so `dvc push`/`pull` carry no dead weight.
    """
    atomic_write_json(checkpoint_dir / COMPLETE_NAME, {"fingerprint": fp, "iterations": iteration})
    with contextlib.suppress(FileNotFoundError):
        (checkpoint_dir / CHECKPOINT_NAME).unlink()


def _checkpoint(path, rank, model, optimizer, epoch, iteration, history, fp, epoch_losses):
    if rank != 0:
        return
    save_checkpoint(
        path,
        {
            "fingerprint": fp,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "history": history,
            "epoch_losses": list(epoch_losses),
            "rng": _rng_state(),
        },
    )
