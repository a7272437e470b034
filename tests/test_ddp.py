"""DDP on CPU (two ranks, gloo) beyond "two processes equal one": the process group's device,
per-rank dropout, and both ranks' RNG across a resume.

The ranks are spawned processes that call `pipeline.training.train.train` directly (torchrun's
environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT), so each can patch the training code for what
it records: the RNG state at each step, the dropout masks, the collectives' arguments. A rank
runs several jobs one after another (a fresh process group each), which pays the start-up of
two Python processes with torch once per test instead of once per run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from tests.helpers import base_cfg, state_dict

# `shards` (conftest): 8 + 4 real VOC images at 64 px

WORLD = 2
# The device the guarded runs are told to train on: an explicitly indexed CPU device, the stand-in
# for `cuda:<LOCAL_RANK>`. It computes on the CPU like the tensors made without a device, but
# `GroupDeviceGuard` tells the two apart.
TOLD = torch.device("cpu", 0)


# --- enforcing the process group's device ---------------------------------------------------


class ForeignDeviceCollective(AssertionError):
    """A collective got a tensor that does not live on the process group's device."""


# collectives that take tensors: each must be on the group's device (NCCL: CUDA only). DDP's own
# start-up calls (parameter shapes, the initial broadcast) are checked too.
TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "_broadcast_coalesced",
    "_verify_params_across_processes",
)
# collectives that pickle objects onto the current device themselves: only counted
OBJECT_COLLECTIVES = (
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "barrier",
)


class GroupDeviceGuard(TorchFunctionMode):
    """Tracks which tensors would live on `told` if `told` were a device of its own (a GPU),
    the way CUDA residency propagates, although every tensor here computes on the CPU:

    - a factory call with `device=told` (torch.tensor, zeros, ...) makes a resident tensor;
      one without a device, or with another (`device="cpu"`), does not;
    - `.to(told)` makes one, `.to("cpu")` and `.cpu()` do not, `.to(other_tensor)` follows it;
    - `param.data = t` (how `module.to(told)` moves parameters) follows `t`;
    - in-place ops (`add_`, `+=`, `copy_`) leave a tensor where it was;
    - any other op's outputs are resident when one of its tensor inputs is.

    `guard_collectives` then makes every tensor collective in `torch.distributed` raise
    `ForeignDeviceCollective` before it runs when a tensor argument is not resident: under
    NCCL that call would fail with "No backend type associated with device type cpu".
    """

    def __init__(self, told: torch.device) -> None:
        super().__init__()
        self.told = told
        self.resident_set: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.calls: Counter[str] = Counter()  # collective -> calls that passed the check

    def resident(self, t: Tensor) -> bool:
        return t in self.resident_set

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func == Tensor.data.__set__:
            self._mark([args[0]], isinstance(args[1], Tensor) and self.resident(args[1]))
        elif not (name.startswith("__i") or (name.endswith("_") and not name.startswith("__"))):
            resident = self._resident_result(name, args, kwargs)
            if args and out is args[0] and resident != self.resident(out):
                if name not in ("to", "cpu"):
                    return out  # an op that returned its input left it where it was
                out = out.clone()  # off the device: a copy, as on a GPU
            self._mark([t for t in tree_leaves(out) if isinstance(t, Tensor)], resident)
        return out

    def _mark(self, tensors: list[Tensor], resident: bool) -> None:
        for t in tensors:
            if resident:
                self.resident_set[t] = True
            else:
                self.resident_set.pop(t, None)

    def _resident_result(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name == "cpu":
            return False
        if name == "to":
            for a in (*args[1:], *kwargs.values()):
                if isinstance(a, Tensor):
                    return self.resident(a)
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            return self.resident(args[0]) if device is None else device == self.told
        if kwargs.get("device") is not None:
            return torch.device(kwargs["device"]) == self.told
        return any(self.resident(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))


def guard_collectives(stack: contextlib.ExitStack, guard: GroupDeviceGuard) -> None:
    """Patch `torch.distributed`'s collectives (as the training code and DDP look them up) to
    check their tensors against `guard` and count the calls."""

    def checked(name: str, original):
        def call(*args, **kwargs):
            if name in TENSOR_COLLECTIVES:
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
                foreign = [t for t in tensors if not guard.resident(t)]
                if foreign:
                    raise ForeignDeviceCollective(
                        f"dist.{name} got {len(foreign)} tensor(s) not on the process group's "
                        f"device {guard.told} (first: {tuple(foreign[0].shape)} "
                        f"{foreign[0].dtype}): create them with device=... or .to(device)"
                    )
            guard.calls[name] += 1
            return original(*args, **kwargs)

        return call

    for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
        original = getattr(dist, name, None)
        if original is not None:
            stack.enter_context(mock.patch.object(dist, name, checked(name, original)))


def _deliberate_bugs(guard: GroupDeviceGuard) -> dict[str, str]:
    """Collectives on tensors made the wrong way and the right way, in an initialised group:
    what each raised ("" when it ran)."""
    wrong = {
        "no device": lambda: torch.tensor([1.0]),
        "hard-coded cpu": lambda: torch.ones(1, device="cpu"),
        "moved back to cpu": lambda: torch.ones(1, device=TOLD).cpu(),
    }
    right = {
        "device=told": lambda: torch.tensor([1.0], device=TOLD),
        ".to(told)": lambda: torch.tensor([1.0]).to(TOLD),
        "derived": lambda: torch.ones(2, device=TOLD).sum().double().unsqueeze(0),
    }
    outcome = {}
    for label, make in {**wrong, **right}.items():
        try:
            t = make()
            before = t.clone()
            dist.all_reduce(t)
            outcome[label] = "" if torch.equal(t, 2 * before) else f"wrong sum {t}"
        except ForeignDeviceCollective as e:
            outcome[label] = str(e)
    return outcome


# --- the rank processes -----------------------------------------------------------------------


class _Stop(Exception):
    """Ends a job right after a checkpoint was saved, as a kill there would."""


def _record(stack: contextlib.ExitStack) -> dict[str, list]:
    """Record, on this rank, the RNG state at the start of each step and each training-mode
    dropout call's input-nonzero (`live`) and output-nonzero (`kept`) maps."""
    rec: dict[str, list] = {"step_rng": [], "drop": []}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training:
            rec["drop"].append({"live": inputs[0] != 0, "kept": output != 0})

    import pipeline.training.start as start
    import pipeline.training.train as pt

    original_set_dropout, original_step = start.set_dropout, pt.train_one_step

    def set_dropout(model: nn.Module, p: float) -> None:
        original_set_dropout(model, p)
        for m in model.modules():
            if isinstance(m, nn.Dropout | nn.Dropout2d):
                m.register_forward_hook(hook)

    def train_one_step(ctx, micro):
        rec["step_rng"].append(torch.get_rng_state())
        return original_step(ctx, micro)

    stack.enter_context(mock.patch.object(start, "set_dropout", set_dropout))
    stack.enter_context(mock.patch.object(pt, "train_one_step", train_one_step))
    return rec


def _run_job(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    import pipeline.training.distributed as distributed
    import pipeline.training.resume as resume
    import pipeline.training.step as step
    import pipeline.training.train as pt

    os.environ["MASTER_PORT"] = str(job["port"])
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        guard = None
        if job.get("guard"):
            guard = GroupDeviceGuard(TOLD)
            guard_collectives(stack, guard)
            # a loss read-back (and with it the checkpoint clock's broadcast) at every step
            stack.enter_context(mock.patch.object(step, "LOSS_READBACK_EVERY", 1))
            # params name a device kind only (cpu, cuda): the indexed stand-in comes from here
            stack.enter_context(mock.patch.object(pt, "resolve_device", lambda name: TOLD))
            stack.enter_context(guard)
        if job.get("plant") == "normaliser_without_device":
            original = step.step_normaliser

            def forgets_device(targets, loss, world, device=None):
                return original(targets, loss, world)  # the count lands on the CPU

            stack.enter_context(mock.patch.object(step, "step_normaliser", forgets_device))
        if job.get("stop_after_checkpoint"):
            saved = resume.CheckpointCadence.saved

            def stop(self) -> None:
                saved(self)
                raise _Stop

            stack.enter_context(mock.patch.object(resume.CheckpointCadence, "saved", stop))
        rec = _record(stack) if job.get("record") else None
        try:
            if job.get("only_deliberate_bugs"):
                distributed.init_distributed(TOLD)
                result["bugs"] = _deliberate_bugs(guard)
            else:
                run = Path(job["run_dir"])
                out = pt.train(
                    "fcn32s",
                    job["cfg"],
                    train_dir=Path(job["train_dir"]),
                    val_dir=Path(job["val_dir"]),
                    out_model=run / "fcn32s.pt",
                    resume_dir=run / "resume",
                    live_dir=None,
                    progress=False,
                )
                result["iterations"] = out["iterations"]
        except _Stop:
            result["stopped"] = True
            if rank == 0:  # what the resumed run will load (it removes the file when done)
                (ckpt,) = (Path(job["run_dir"]) / "resume").glob("*/last.pt")
                saved = torch.load(ckpt, map_location="cpu", weights_only=True)
                result["checkpoint"] = {"iteration": saved["iteration"], "rng": saved["rng"]}
        except ForeignDeviceCollective as e:
            result["foreign"] = str(e)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if guard is not None:
            result["calls"] = dict(guard.calls)
        if rec is not None:
            result.update(rec)
    return result


def _rank_main(rank: int, world: int, jobs: list[dict[str, Any]], out: str) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    results = {job["name"]: _run_job(rank, job) for job in jobs}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(jobs: list[dict[str, Any]], out: Path, timeout: float = 180) -> list[dict]:
    """Run `jobs` in order on `WORLD` spawned ranks; each rank's {job name: result}."""
    for job in jobs:
        job["port"] = free_port()
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _rank_main, args=(WORLD, jobs, str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def tiny_cfg(**train_overrides: Any) -> dict[str, Any]:
    """Width 1/32, 32 px crops, batch 1 per rank: 8 images on 2 ranks are 4 steps an epoch."""
    cfg = base_cfg(batch_size=1, crop_size=32, fcn32s={"epochs": 1, "lr": 0.01})
    cfg["model"].update(width=0.03125, dropout=0.5)
    cfg["train"].update(train_overrides)
    return cfg


def job(name: str, shards: dict[str, Path], run_dir: Path, cfg: dict, **kw: Any) -> dict:
    return dict(
        name=name,
        cfg=cfg,
        train_dir=str(shards["small"]),
        val_dir=str(shards["val"]),
        run_dir=str(run_dir),
        **kw,
    )


# --- 1. no collective on a tensor off the process group's device ------------------------------


@pytest.mark.slow
def test_ddp_collectives_only_see_tensors_on_the_process_groups_device(shards, tmp_path) -> None:
    """Under NCCL a collective on a CPU tensor fails ("No backend type associated with device
    type cpu"); under gloo on CPU every tensor is a CPU tensor and the mistake passes unseen.

    How this test sees it: the ranks are told to train on `cpu:0` (`TOLD`, standing in for
    `cuda:<rank>`, what `resolve_device` returns in those jobs), and `GroupDeviceGuard` (a TorchFunctionMode, active for the whole run) tracks
    which tensors would live on that device, as CUDA would: made with `device=...`, moved with
    `.to(device)`, or computed from such tensors. Every tensor collective in torch.distributed
    (the ones pipeline.training calls and DDP's start-up broadcast) is patched to raise before it
    runs when a tensor argument is not such a tensor, on every rank at the same call, so none
    hangs. Shown to bite: tensors made without a device, with a hard-coded `device="cpu"` or
    moved back with `.cpu()` are refused, in an initialised group and in the training loop
    itself (a step normaliser that forgets its device), while the real loop, run through its
    checkpoint, loss read-back, checkpoint clock, resume check and validation, passes.
    Not covered: DDP's gradient all-reduce, which runs in C++ on the parameters' device.
    """
    common = dict(checkpoint_every=2, checkpoint_minutes=60.0)
    jobs = [
        dict(name="bugs", guard=True, only_deliberate_bugs=True),
        job("real", shards, tmp_path / "real", tiny_cfg(**common), guard=True),
        job(
            "planted",
            shards,
            tmp_path / "planted",
            tiny_cfg(**common),
            guard=True,
            plant="normaliser_without_device",
        ),
    ]
    ranks = run_ranks(jobs, tmp_path / "ranks")
    for rank, res in enumerate(ranks):
        bugs = res["bugs"]["bugs"]
        for label in ("no device", "hard-coded cpu", "moved back to cpu"):
            assert "not on the process group's device cpu:0" in bugs[label], (rank, label, bugs)
        for label in ("device=told", ".to(told)", "derived"):
            assert bugs[label] == "", (rank, label, bugs)

        real = res["real"]
        assert "foreign" not in real, (rank, real)
        assert real["iterations"] == 4, (rank, real)
        calls = real["calls"]
        # every kind of collective the loop makes was checked (the guard was not bypassed):
        # step normaliser, loss read-back, resume check and validation; the checkpoint
        # clock; DDP's start-up; the checkpoint's RNG gather and the final barrier
        assert calls["all_reduce"] >= 4 + 4 + 2 + 1, (rank, calls)
        assert calls["broadcast"] >= 2, (rank, calls)  # steps 1 and 3 (2, 4: checkpoints)
        assert calls["_broadcast_coalesced"] >= 1 and calls["_verify_params_across_processes"]
        assert calls["all_gather_object"] >= 2 and calls["barrier"] >= 1, (rank, calls)

        planted = res["planted"]
        assert "dist.all_reduce got 1 tensor(s) not on the process group's device" in planted.get(
            "foreign", ""
        ), (rank, planted)
    assert (tmp_path / "real" / "fcn32s.pt").exists()
    assert not (tmp_path / "planted" / "fcn32s.pt").exists()


# --- 2./3. per-rank dropout, and both ranks' RNG across a resume ------------------------------


@pytest.fixture(scope="module")
def dropout_runs(shards, tmp_path_factory) -> tuple[list[dict], Path]:
    """Dropout 0.5 on 2 ranks, 4 steps: a run (`a`), the same run again (`b`), and a run
    stopped right after its checkpoint at iteration 2 (`stopped`), then resumed (`resumed`)."""
    root = tmp_path_factory.mktemp("dropout_runs")
    cfg = tiny_cfg(checkpoint_every=2)
    jobs = [
        job("a", shards, root / "a", cfg, record=True),
        job("b", shards, root / "b", cfg, record=True),
        job("stopped", shards, root / "resumed", cfg, record=True, stop_after_checkpoint=True),
        job("resumed", shards, root / "resumed", cfg, record=True),
    ]
    return run_ranks(jobs, root / "ranks"), root


@pytest.mark.slow
def test_two_ranks_draw_different_dropout_masks_reproducibly(dropout_runs) -> None:
    """Rank r's RNG is seeded with seed + r: the ranks drop different units (the same masks
    would correlate the ranks' gradient noise), and the same run gives the same masks again."""
    (r0, r1), _ = dropout_runs
    a0, a1 = r0["a"], r1["a"]
    assert a0["iterations"] == a1["iterations"] == 4
    assert len(a0["drop"]) == len(a1["drop"]) == 4 * 2  # drop6 and drop7 at each step
    # the ranks see different images: compare the masks where both ranks' inputs are nonzero,
    # where identical RNG states would keep exactly the same units
    differ = compared = 0
    for d0, d1 in zip(a0["drop"], a1["drop"], strict=True):
        both = d0["live"] & d1["live"]
        compared += int(both.sum())
        differ += int((d0["kept"] != d1["kept"])[both].sum())
        assert 0 < int(d0["kept"].sum()) < int(d0["live"].sum())  # dropout acts
    assert compared > 100, compared
    assert 0.3 < differ / compared < 0.7, (differ, compared)  # independent p=0.5 masks
    assert not torch.equal(a0["step_rng"][0], a1["step_rng"][0])

    for rank, res in enumerate((r0, r1)):
        a, b = res["a"], res["b"]
        assert len(a["drop"]) == len(b["drop"])
        for i, (da, db) in enumerate(zip(a["drop"], b["drop"], strict=True)):
            assert torch.equal(da["live"], db["live"]), (rank, i)
            assert torch.equal(da["kept"], db["kept"]), (rank, i)
        for i, (sa, sb) in enumerate(zip(a["step_rng"], b["step_rng"], strict=True)):
            assert torch.equal(sa, sb), (rank, i)


@pytest.mark.slow
def test_resume_restores_each_ranks_rng_state(dropout_runs) -> None:
    """Stopped right after the checkpoint at iteration 2 (mid-epoch) and resumed: each rank's
    checkpointed RNG state is the one it had there in the uninterrupted run, the resumed run
    starts step 3 from it, draws the same dropout masks as the uninterrupted run, and ends with
    the same weights."""
    ranks, root = dropout_runs
    for rank, res in enumerate(ranks):
        a, stopped, resumed = res["a"], res["stopped"], res["resumed"]
        assert stopped.get("stopped") and len(stopped["step_rng"]) == 2, (rank, stopped)
        assert resumed["iterations"] == 4 and len(resumed["step_rng"]) == 2, (rank, resumed)
        for i in range(2):  # the stopped run's steps were the uninterrupted run's
            assert torch.equal(stopped["step_rng"][i], a["step_rng"][i]), (rank, i)
        for i in range(2):  # steps 3 and 4
            assert torch.equal(resumed["step_rng"][i], a["step_rng"][2 + i]), (
                f"rank {rank}: the RNG at resumed step {3 + i} is not the uninterrupted run's"
            )
        for i, (dr, da) in enumerate(zip(resumed["drop"], a["drop"][2 * 2 :], strict=True)):
            assert torch.equal(dr["kept"], da["kept"]), (rank, i)
    # the checkpoint holds both ranks' states as they were at iteration 2
    ckpt = ranks[0]["stopped"]["checkpoint"]
    assert ckpt["iteration"] == 2 and len(ckpt["rng"]) == WORLD
    for rank, res in enumerate(ranks):
        assert torch.equal(ckpt["rng"][rank]["torch"], res["a"]["step_rng"][2]), rank
    sa, sr = state_dict(root / "a" / "fcn32s.pt"), state_dict(root / "resumed" / "fcn32s.pt")
    for k in sa:
        assert torch.equal(sa[k], sr[k]), k
