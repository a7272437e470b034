"""Processes of a training stage: its lifetime, its lock, its DDP process group, its data order.

A trainer never outlives the `dvc` that launched it (`die_with_parent`), two trainers never
run the same stage with the same inputs (`exclusive_lock`), and under torchrun the ranks join
one process group (`init_distributed`) and split each epoch's seeded order between them
(`EpochKeySampler`) so that their union is exactly the single-process order.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Multiplies the seed before the epoch is added, so that (seed, epoch) pairs of nearby seeds
# never share a generator; a prime well above any epoch count.
EPOCH_SEED_STRIDE = 1_000_003


# --- a trainer never outlives its launcher, two never share a stage ---------------------------


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


def loader_worker_init(worker_id: int, trainer_pid: int) -> None:
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


# --- the process group -----------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA.

    Returns True when this call joined one, False alone or when already joined.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def gather_objects(mine: Any, world: int) -> list[Any]:
    """Every rank's `mine` (picklable), by rank: a collective, all ranks call it together."""
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def decided_by_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (a broadcast on `device`, the process group's device:
    NCCL takes CUDA tensors only); `flag` itself alone. Used where each rank's own clock would
    let the ranks disagree and one of them hang in a collective the others skip."""
    rank, world = dist_info()
    if world == 1:
        return flag
    t = torch.tensor([1 if flag and rank == 0 else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# --- data order ------------------------------------------------------------------------------


class EpochKeySampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch, split across ranks, that can start mid-epoch; it yields
    (epoch, index) keys, not bare indices.

    Rank r takes positions r, r+W, r+2W, ... of the permutation (padded by wrapping so every
    rank gets the same count), so the union of the ranks' first k batches is exactly the first
    k global batches of the single-process order. The dataset seeds a sample's augmentation
    from the key's epoch (`SegmentationShards.__getitem__`), so one loader with persistent
    workers serves every epoch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.skip = 0  # samples of this rank to skip (resume mid-epoch)
        self.per_rank = math.ceil(n / world)

    def epoch_seed(self) -> int:
        """The seed of this epoch's permutation (and of the loader's own generator)."""
        return self.seed * EPOCH_SEED_STRIDE + self.epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` next, leaving out this rank's first `skip` samples of it."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """This rank's dataset indices of the current epoch, the skipped ones included."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.epoch_seed())
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
