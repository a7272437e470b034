"""Resume state of a training stage: what decides its result, where it is kept, what it holds.

DVC 3 has no built-in checkpoints, and resume state kept in a DVC output costs twice: `dvc exp
run` checks out the committed version of a `persist: true` output (deleting an interrupted run's
checkpoint), and a stage with a persist output never uses the run-cache. So resume state lives
outside every DVC output, in `.fcn-resume/<stage>/<fingerprint>/` at the repository root
(`resume_root`), which a queued experiment's temporary copy finds too.

The fingerprint covers exactly what decides the stage's result (`RunInputs`): the params keys the
stage declares in dvc.yaml (`declared_params`), the digest of the model or weights it starts
from and of the data. A rerun resumes only from a checkpoint with the same fingerprint and
otherwise says which inputs changed. Each rank's RNG state is saved with the checkpoint
(`gather_rng_states`), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.training.distributed import exclusive_lock, gather_objects

CHECKPOINT_NAME = "last.pt"
INPUTS_NAME = "inputs.json"
RESUME_DIR_NAME = ".fcn-resume"
RESUME_DIR_ENV = "FCN_RESUME_DIR"
PROJECT_DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"


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
    """The params keys `stage` declares in dvc.yaml, as written there (`train.lr`).

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
    """{full dotted key: value} of the declared `keys` in `cfg` (`load_params`' dict); a key
    naming a section becomes one entry per leaf (`train.fcn32s` -> `train.fcn32s.lr`,
    `.epochs`), so a change names its key.

    Raises:
        KeyError: a key is not in params.
    """
    flat: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            flat[key] = value

    for key in keys:
        parts = key.split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{key}: {'.'.join(parts[: i + 1])} is not in params")
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
        """sha256 (hex) of `to_json`: the name of this run's resume folder."""
        return fingerprint(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The inputs as JSON (`inputs.json` beside the checkpoint)."""
        return {"stage": self.stage, "params": self.params, "init": self.init, "data": self.data}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunInputs:
        """The inputs `to_json` wrote."""
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
        """The checkpoint's dict: one key per field, loadable with `weights_only=True`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def fresh(cls, fingerprint: str) -> ResumeState:
        """The state of a run of inputs `fingerprint` before its first step."""
        return cls(
            fingerprint=fingerprint,
            model={},
            optimizer={},
            epoch=0,
            iteration=0,
            history=[],
            epoch_losses=[],
            scores={},
            rng=[],
        )

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
        """Write `state` as this run's checkpoint (atomically), and its inputs beside it."""
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
        """Whether `iteration` steps done is a multiple of `every_iterations`."""
        return iteration % self.every_iterations == 0

    def due_by_time(self) -> bool:
        """Whether `every_minutes` have passed on this process's clock since the last save."""
        return self.every_minutes is not None and (
            self.clock() - self.last >= 60.0 * self.every_minutes
        )

    def saved(self) -> None:
        """A checkpoint was just written: the time cadence restarts."""
        self.last = self.clock()


# --- per-rank randomness -------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch RNG state (CPU and every CUDA device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state `rng_state` captured (its CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, by rank (a collective: all ranks call it at the same step)."""
    return gather_objects(rng_state(), world)


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
