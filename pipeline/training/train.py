"""Training loop for FCN-32s -> FCN-16s -> FCN-8s: staged, resumable, DDP-ready, seeded.

One `train()` call trains one stage of the paper's cascade (Long, Shelhamer, Darrell, CVPR
2015, section 4.2): FCN-32s from ImageNet VGG16, FCN-16s and FCN-8s from the previous stage's
model. Read top to bottom, this module is the recipe:

1. `train`: typed params, device and process group, the data, the resume store and its lock;
2. `_train_stage`: resume or initialise (`pipeline.training.start`), then `StageRun`:
3. `StageRun.run_epochs` -> `run_epoch` -> `step`: the lr of the step (`LrSchedule`), one
   optimiser step (`pipeline.training.step`), loss read-back, mid-epoch validation, checkpoints;
4. `StageRun.end_epoch`: the epoch's DVCLive point (`pipeline.training.live`), validation
   (`pipeline.training.validation`), a checkpoint (`pipeline.training.resume`);
5. `StageRun.finish`: the model file; the spent resume state is removed.

Data order and augmentation derive from (seed, epoch, index), each rank's RNG state is saved
with the checkpoint, and the DVCLive history is replayed from it: a killed run that resumes
ends with the same weights and the same logs as an uninterrupted one (fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pipeline.device import grad_scaler, resolve_device, resolve_precision
from pipeline.training.distributed import (
    EpochKeySampler,
    decided_by_rank0,
    dist_info,
    init_distributed,
    loader_worker_init,
)
from pipeline.training.live import epoch_entry, log_history, open_live, since_last_entry
from pipeline.training.recipe import (
    ModelConfig,
    StageRecipe,
    TrainConfig,
    model_config,
    train_config,
)
from pipeline.training.resume import (
    PROJECT_DVC_YAML,
    CheckpointCadence,
    ResumeState,
    ResumeStore,
    RunInputs,
    gather_rng_states,
)
from pipeline.training.solver import LrSchedule, iteration_budget
from pipeline.training.start import start_or_resume
from pipeline.training.step import (
    LossReadback,
    StepContext,
    enable_fast_kernels,
    train_one_step,
    training_module,
)
from pipeline.training.validation import validate, validation_due

# --- the stage -------------------------------------------------------------------------------


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

    `cfg` is the whole profile because the resume fingerprint covers every key the stage
    declares in `dvc_yaml`; the loop itself reads the typed `train` and `model` sections.
    `resume_dir` is the stage's resume folder (`resume_root() / name` for the DVC stage); an
    interrupted run with the same `RunInputs` is continued from there. Returns
    {"iterations", "history", "scores"}; "scores" are the last validation's.

    Raises:
        ParamsError: the `train` or `model` section does not validate.
        StageBusyError: a live run of the same stage and inputs holds the lock.
        FloatingPointError: the loss became NaN or infinite.
        ValueError: the training set is empty, or the VGG16 weights are unusable.
    """
    tc, mc = train_config(cfg), model_config(cfg)
    device = resolve_device(tc.device)
    distributed = init_distributed(device)
    train_set, val_set = open_datasets(tc, Path(train_dir), Path(val_dir))
    init_path = init_from if init_from is not None else vgg16_path
    inputs = RunInputs.of_stage(
        name, cfg, init_path=init_path, train_dir=train_dir, val_dir=val_dir, dvc_yaml=dvc_yaml
    )
    store = ResumeStore(Path(resume_dir), inputs)
    with store.lock() if dist_info()[0] == 0 else contextlib.nullcontext():
        recipe = tc.stages[name]
        model, state, ctx = _start(
            recipe, tc, mc, store, vgg16_path, init_from, device, distributed
        )
        run = StageRun.begin(
            recipe, tc, store, state, model, ctx, train_set, val_set, live_dir, progress
        )
        run.run_epochs()
        result = run.finish(Path(out_model))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def open_datasets(tc: TrainConfig, train_dir: Path, val_dir: Path) -> tuple[Any, Any]:
    """(training set with the seeded augmentation of `tc`, val set at original resolution).

    Raises:
        ValueError: the training set is empty.
    """
    from pipeline.data.datasets import SegmentationShards
    from pipeline.data.transforms import eval_transform, train_transform

    train_set = SegmentationShards(
        train_dir,
        transform=train_transform(tc.crop_size, tc.scale_range, tc.hflip, tc.color_jitter),
        seed=tc.seed,
    )
    val_set = SegmentationShards(val_dir, transform=eval_transform())
    if len(train_set) == 0:
        raise ValueError(f"{train_dir}: the training set is empty")
    return train_set, val_set


def _start(
    recipe: StageRecipe,
    tc: TrainConfig,
    mc: ModelConfig,
    store: ResumeStore,
    vgg16_path: Path | None,
    init_from: Path | None,
    device: torch.device,
    distributed: bool,
) -> tuple[nn.Module, ResumeState, StepContext]:
    """With the lock held: the precision, the model, optimiser and progress to go on from
    (`start_or_resume`), the device's fast kernels, and what each step runs on (the DDP
    wrapper's construction is a collective: every rank gets here)."""
    amp_dtype = resolve_precision(tc.precision, device)
    if amp_dtype is None and device.type == "cpu":
        # bit-exact CPU runs (resume and DDP equivalence rely on it)
        torch.use_deterministic_algorithms(True, warn_only=True)
    model, optimizer, state = start_or_resume(
        recipe,
        tc,
        mc,
        store,
        vgg16_path=vgg16_path,
        init_from=init_from,
        device=device,
        say=_say_on_rank0(),
    )
    enable_fast_kernels(device)
    ctx = StepContext(
        model=training_module(model, device, distributed, tc.compile),
        optimizer=optimizer,
        scaler=grad_scaler(device, amp_dtype),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=tc.channels_last,
        loss=tc.loss,
        world=dist_info()[1],
        distributed=distributed,
    )
    return model, state, ctx


def _say_on_rank0() -> Callable[..., None]:
    """`print` on rank 0, nothing on the other ranks (one log line per event)."""
    return print if dist_info()[0] == 0 else (lambda *a, **k: None)


# --- the data path ---------------------------------------------------------------------------


def make_loader(
    train_set: Any, sampler: EpochKeySampler, batch_size: int, workers: int, device: torch.device
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
        worker_init_fn=functools.partial(loader_worker_init, trainer_pid=os.getpid()),
        generator=torch.Generator().manual_seed(sampler.epoch_seed()),
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


# --- the loop --------------------------------------------------------------------------------


@dataclass
class StageRun:
    """One stage's training in progress: what the loop reads and what it advances (`state`)."""

    recipe: StageRecipe
    tc: TrainConfig
    store: ResumeStore
    state: ResumeState  # advanced in place: iteration, epoch, losses, history, scores
    model: nn.Module  # the plain module (checkpoints, validation, the model file)
    ctx: StepContext  # the step's module (DDP/compile wrapper), optimiser, device, precision
    sampler: EpochKeySampler
    train_set: Any
    val_set: Any
    steps_per_epoch: int
    epochs: int
    schedule: LrSchedule
    cadence: CheckpointCadence
    readback: LossReadback
    live: Any  # the DVCLive logger on rank 0, else None
    progress: bool
    rank: int
    world: int
    lr_now: float = 0.0  # the rate of the last step taken: what the next entry logs
    bar: Any = None  # tqdm, while `run_epochs` runs
    started: tuple[float, int] = (0.0, 0)  # (wall time, iteration) when this run began

    @classmethod
    def begin(
        cls,
        recipe: StageRecipe,
        tc: TrainConfig,
        store: ResumeStore,
        state: ResumeState,
        model: nn.Module,
        ctx: StepContext,
        train_set: Any,
        val_set: Any,
        live_dir: Path | None,
        progress: bool,
    ) -> StageRun:
        """The data order, the budget, the checkpoint cadence and the DVCLive logger (the
        interrupted run's points replayed) of a run starting at `state`."""
        rank, world = dist_info()
        sampler = EpochKeySampler(len(train_set), tc.seed, rank, world)
        steps_per_epoch = math.ceil(sampler.per_rank / (tc.batch_size * tc.accumulate))
        total_steps, epochs = iteration_budget(recipe, steps_per_epoch)
        return cls(
            recipe=recipe,
            tc=tc,
            store=store,
            state=state,
            model=model,
            ctx=ctx,
            sampler=sampler,
            train_set=train_set,
            val_set=val_set,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            schedule=LrSchedule(recipe.lr, tc.lr_policy, total_steps),
            cadence=CheckpointCadence(tc.checkpoint_every, tc.checkpoint_minutes),
            readback=LossReadback(recipe.name, tc.loss, world),
            live=open_live(live_dir, state.history) if rank == 0 else None,
            progress=progress,
            rank=rank,
            world=world,
        )

    def run_epochs(self) -> None:
        """Every epoch left, from the state's epoch and iteration on; the loader's workers
        start here and end with this call."""
        self.bar = self._progress_bar()
        # the rate of the last step taken: what an epoch that resumes at its very end logs
        self.lr_now = self.schedule.at(max(self.state.iteration - 1, 0))
        self.started = (time.time(), self.state.iteration)
        loader = make_loader(
            self.train_set, self.sampler, self.tc.batch_size, self.tc.workers, self.ctx.device
        )
        for epoch in range(self.state.epoch, self.epochs):
            self.run_epoch(epoch, loader)
        self.bar.close()

    def run_epoch(self, epoch: int, loader: DataLoader) -> None:
        """One epoch's remaining steps (a resumed epoch skips the samples already seen), then
        its entry and checkpoint."""
        epoch_start = epoch * self.steps_per_epoch  # iterations before this epoch
        first_step = self.state.iteration - epoch_start
        if first_step == 0:
            self.state.epoch_losses = []
        self.sampler.set_epoch(epoch, skip=first_step * self.tc.batch_size * self.tc.accumulate)
        self.model.train()
        # max_iter cuts the last epoch short
        epoch_end = epoch_start + min(self.steps_per_epoch, self.schedule.total_steps - epoch_start)
        for micro in micro_batches(loader, self.tc.accumulate, epoch_end - self.state.iteration):
            checkpoint_due = self.step(epoch, micro)
            if validation_due(self.state.iteration, epoch_end, self.tc.val_every_iter):
                self.log_point(epoch, epoch_start, score=True)
            if checkpoint_due and self.state.iteration < self.schedule.total_steps:
                self.checkpoint()
        self.end_epoch(epoch, epoch_start)

    def step(self, epoch: int, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """One optimiser step at this iteration's rate; the losses read back when a block is
        full. Returns whether a checkpoint is due (by iteration count, or by rank 0's clock,
        which under DDP is only consulted at read-back points)."""
        self.lr_now = self.schedule.apply(self.ctx.optimizer, self.state.iteration)
        self.readback.add(train_one_step(self.ctx, micro), self.state.iteration)
        self.state.iteration += 1
        self.bar.update(1)
        readback_due = self.readback.due()
        if readback_due:
            self.state.epoch_losses.extend(self.readback.flush())
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{self.state.epoch_losses[-1]:.4g}")
        return self.cadence.due_by_iteration(self.state.iteration) or (
            (self.world == 1 or readback_due)
            and decided_by_rank0(self.cadence.due_by_time(), self.ctx.device)
        )

    def end_epoch(self, epoch: int, epoch_start: int) -> None:
        """The epoch's entry (validated every `val_every` epochs and after the last), its log
        line, and a checkpoint that starts the next epoch."""
        validate_now = (epoch + 1) % self.tc.val_every == 0 or epoch + 1 == self.epochs
        entry = self.log_point(epoch, epoch_start, score=validate_now)
        if self.progress and self.rank == 0:
            msg = ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "epoch")
            print(f"[train] {self.recipe.name} epoch {epoch + 1}/{self.epochs}: {msg}", flush=True)
        self.state.epoch, self.state.epoch_losses = epoch + 1, []
        self.checkpoint()

    def log_point(self, epoch: int, epoch_start: int, *, score: bool) -> dict[str, float]:
        """One DVCLive point: the mean loss since the last point, the rate, the iterations
        and, when `score`, the val scores (every rank joins the validation)."""
        self.state.epoch_losses.extend(self.readback.flush())
        losses = since_last_entry(self.state.epoch_losses, self.state.history, epoch_start)
        entry = epoch_entry(epoch, losses, self.lr_now, self.state.iteration)
        if score:
            self.state.scores = validate(
                self.model,
                self.val_set,
                self.ctx.device,
                self.ctx.amp_dtype,
                self.tc.channels_last,
                self.rank,
                self.world,
            )
            entry["val/mean_iou"] = self.state.scores["mean_iou"]
            entry["val/pixel_accuracy"] = self.state.scores["pixel_accuracy"]
        self.state.history.append(entry)
        log_history(self.live, entry)
        return entry

    def checkpoint(self) -> None:
        """Save the state with the current weights (every rank joins: the RNG gather)."""
        self.state.epoch_losses.extend(self.readback.flush())
        rng = gather_rng_states(self.world)
        if self.rank == 0:
            self.state.model = self.model.state_dict()
            self.state.optimizer = self.ctx.optimizer.state_dict()
            self.state.rng = rng
            self.store.save(self.state)
        self.cadence.saved()

    def finish(self, out_model: Path) -> dict[str, Any]:
        """Rank 0 writes the model file, closes the DVCLive log and removes the spent resume
        state. Returns {"iterations", "history", "scores"}."""
        from pipeline.models.fcn import save_model

        if self.rank == 0:
            save_model(out_model, self.model, trained_iterations=self.state.iteration)
            t0, start_iteration = self.started
            print(
                f"[train] {self.recipe.name}: {self.state.iteration} iterations "
                f"({self.state.iteration - start_iteration} in this run) in "
                f"{time.time() - t0:.1f} s",
                flush=True,
            )
            if self.live is not None:
                self.live.end()
            self.store.finish()
        return {
            "iterations": self.state.iteration,
            "history": self.state.history,
            "scores": self.state.scores,
        }

    def _progress_bar(self) -> Any:
        """tqdm over the stage's iterations, on rank 0 when `progress`."""
        from tqdm import tqdm

        return tqdm(
            total=self.schedule.total_steps,
            initial=self.state.iteration,
            desc=f"train {self.recipe.name}",
            unit="it",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15.0,  # logs (dvc repro | tee) stay short
        )
