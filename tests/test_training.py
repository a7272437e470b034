"""The training loop (pipeline.training.train, stages/train.py) on real VOC images.

Everything trains for real on a handful of VOC 2012 images, shrunk to 64-96 px at width 1/16 or
1/8: an overfit check, bit-exact resume after a SIGKILL, DDP == one process, accumulation == one
big batch and checkpoint refusal. (FCN-32s -> FCN-16s transplant agreement on a trained net:
tests/test_cascade.py, on the cascade's own FCN-32s.)
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import load_params
from pipeline.evaluation.metrics import segmentation_scores
from pipeline.models.fcn import load_model
from pipeline.training.recipe import StageRecipe
from pipeline.training.resume import (
    CHECKPOINT_NAME,
    ResumeState,
    ResumeStore,
    RunInputs,
    load_checkpoint,
    rng_state,
)
from pipeline.training.solver import iteration_budget, lr_factor, make_optimizer
from pipeline.training.start import build_initial_model
from pipeline.training.train import train
from pipeline.training.validation import validation_due
from tests.helpers import FROM_SCRATCH_MODEL, FROM_SCRATCH_TRAIN, PlantedCode, base_cfg, state_dict
from tests.repo_utils import (
    scores_on,
    write_tiny_params,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_determinism():
    # train() switches on deterministic algorithms for fp32 CPU runs, process-wide
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=before_warn)


def run_train(name: str, cfg: dict[str, Any], train_dir: Path, val_dir: Path, out: Path, **kw):
    return train(
        name,
        cfg,
        train_dir=train_dir,
        val_dir=val_dir,
        out_model=out / f"{name}.pt",
        resume_dir=out / "resume" / name,
        live_dir=kw.pop("live_dir", None),
        progress=False,
        **kw,
    )


# --- 1. overfitting 8 real images from scratch ------------------------------------------------


@pytest.mark.slow
def test_fcn8s_from_scratch_overfits_eight_real_images(shards, tmp_path) -> None:
    """FCN-8s, random init, no augmentation: >= 90% pixel accuracy on its own 8 training images
    (all-background scores 81% on them, so the net must place the objects)."""
    cfg = base_cfg(
        precision="auto",  # bf16 where the CPU has it: ~2x faster, and must learn as well
        crop_size=64,
        scale_range=[1.0, 1.0],
        hflip=False,
        color_jitter=0.0,
        batch_size=2,
        weight_decay=0.0,
        val_every=1000,
        fcn8s={"epochs": 40, "lr": 0.015},
    )
    cfg["model"]["width"] = 0.125
    result = run_train("fcn8s", cfg, shards["square"], shards["square"], tmp_path)
    losses = [h["train/loss"] for h in result["history"]]
    hist = scores_on(load_model(tmp_path / "fcn8s.pt"), shards["square"])
    scores = segmentation_scores(hist)
    assert losses[-1] < 0.5 * losses[0], losses
    assert scores["pixel_accuracy"] >= 0.90, (scores["pixel_accuracy"], losses[-5:])
    # the loop's own end-of-training validation saw the same net
    assert abs(result["scores"]["pixel_accuracy"] - scores["pixel_accuracy"]) < 0.02


# --- 2./3. the stage CLI in tiny repo dirs: resume after SIGKILL, DDP -------------------------


def make_repo(root: Path, shards: dict[str, Path], **train_overrides: Any) -> Path:
    """A directory the stage runs in: params.yaml (the test profile, changed) + preprocessed data."""
    train = {**FROM_SCRATCH_TRAIN, **train_overrides}
    overrides = {f"train.{k}": v for k, v in train.items()}
    overrides.update({f"model.{k}": v for k, v in FROM_SCRATCH_MODEL.items()})
    root.mkdir(parents=True)
    write_tiny_params(root / "params.yaml", overrides)
    shutil.copytree(shards["small"], root / "data" / "preprocessed" / "train")
    shutil.copytree(shards["val"], root / "data" / "preprocessed" / "val")
    return root


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def run_stage(repo: Path, name: str = "fcn32s", timeout: float = 300) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "stages.train", name, "--no-progress"],
        cwd=repo,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (
        f"stage failed ({p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p.stdout + p.stderr


def live_metrics(repo: Path, name: str = "fcn32s") -> dict[str, Any]:
    """DVCLive's summary and every logged value (timestamps dropped: they differ run to run)."""
    live = repo / "dvclive" / name
    out: dict[str, Any] = {"summary": json.loads((live / "metrics.json").read_text())}
    for tsv in sorted((live / "plots" / "metrics").rglob("*.tsv")):
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        header = rows[0]
        keep = [i for i, h in enumerate(header) if h != "timestamp"]
        out[str(tsv.relative_to(live))] = [[r[i] for i in keep] for r in rows]
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"tensors differ: {differ}"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_matches_uninterrupted_run(shards, tmp_path, workers) -> None:
    """Kill the stage (SIGKILL, no cleanup) after its first mid-epoch checkpoint, rerun it: the
    model and the DVCLive history are bit-identical to a run that was never interrupted."""
    overrides = dict(
        workers=workers, checkpoint_every=3, fcn32s={"epochs": 3, "lr": 0.01}
    )  # 8 images / batch 2: 12 steps, checkpoints at 3, 4, 6, 8, 9, 12
    killed = make_repo(tmp_path / "killed", shards, **overrides)
    resume = killed / ".fcn-resume" / "fcn32s"  # the stage runs outside DVC: <cwd>/.fcn-resume
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", "fcn32s", "--no-progress"],
        cwd=killed,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while (
            not list(resume.glob(f"*/{CHECKPOINT_NAME}"))
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    assert not (killed / "models" / "fcn32s.pt").exists()
    (ckpt,) = resume.glob(f"*/{CHECKPOINT_NAME}")
    at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 3 <= at < 12

    log = run_stage(killed)
    assert f"resuming from {ckpt.resolve()} at iteration {at}" in log, log
    assert not list(resume.glob(f"*/{CHECKPOINT_NAME}")), "a completed run keeps no resume state"

    clean = make_repo(tmp_path / "clean", shards, **overrides)
    assert "resuming" not in run_stage(clean)

    assert_same_weights(killed / "models" / "fcn32s.pt", clean / "models" / "fcn32s.pt")
    assert live_metrics(killed) == live_metrics(clean)
    assert len(live_metrics(clean)["plots/metrics/train/loss.tsv"]) == 1 + 3  # header + epochs


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_same_global_batch(shards, tmp_path) -> None:
    """train.nproc 2 (the stage re-launches itself under torchrun, gloo on CPU), batch 2 per
    rank == one process with batch 4: same data order, augmentation, normalisation, update."""
    common = dict(
        fcn32s={"epochs": 2, "lr": 0.01},
        scale_range=[0.75, 1.25],  # augmentation on: it is seeded per sample, not per rank
        hflip=True,
        color_jitter=0.1,
    )
    one = make_repo(tmp_path / "one", shards, nproc=1, batch_size=4, **common)
    two = make_repo(tmp_path / "two", shards, nproc=2, batch_size=2, **common)
    log_one = run_stage(one)
    log_two = run_stage(two)
    assert "launching 2 processes" in log_two, log_two
    assert "launching" not in log_one

    sa = state_dict(one / "models" / "fcn32s.pt")
    sb = state_dict(two / "models" / "fcn32s.pt")
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert float(sa["score_fr.weight"].abs().sum()) > 0  # it trained (score_fr starts at 0)
    ma, mb = live_metrics(one)["summary"], live_metrics(two)["summary"]
    assert ma["step"] == mb["step"] == 1
    # the loss is logged globally normalised, so both runs log the same value
    assert ma["train"]["loss"] == pytest.approx(mb["train"]["loss"], rel=1e-5)
    # val is split across ranks and summed: the same confusion matrix, the same scores
    assert ma["val"]["mean_iou"] == pytest.approx(mb["val"]["mean_iou"], abs=1e-6)


# --- 4. gradient accumulation ----------------------------------------------------------------


def test_accumulation_equals_one_big_batch(shards, tmp_path) -> None:
    """batch 2 x accumulate 2 == batch 4 x accumulate 1 (global pixel normalisation), with
    augmentation on: each sample's crop/flip/jitter depends on (seed, epoch, index) only."""
    common = dict(
        scale_range=[0.75, 1.25], hflip=True, color_jitter=0.1, fcn32s={"epochs": 2, "lr": 0.01}
    )
    a = run_train(
        "fcn32s",
        base_cfg(batch_size=2, accumulate=2, **common),
        shards["small"],
        shards["val"],
        tmp_path / "a",
    )
    b = run_train(
        "fcn32s",
        base_cfg(batch_size=4, accumulate=1, **common),
        shards["small"],
        shards["val"],
        tmp_path / "b",
    )
    assert a["iterations"] == b["iterations"] == 4
    sa, sb = state_dict(tmp_path / "a" / "fcn32s.pt"), state_dict(tmp_path / "b" / "fcn32s.pt")
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(sa["score_fr.weight"].abs().sum()) > 0  # it trained
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train/loss"] == pytest.approx(hb["train/loss"], rel=1e-5)
    # and a different split of the same batch is not a no-op comparison: batch 2 alone differs
    c = run_train(
        "fcn32s",
        base_cfg(batch_size=2, accumulate=1, **common),
        shards["small"],
        shards["val"],
        tmp_path / "c",
    )
    assert c["iterations"] == 8
    sc = state_dict(tmp_path / "c" / "fcn32s.pt")
    assert not torch.allclose(sc["score_fr.weight"], sa["score_fr.weight"], rtol=1e-4, atol=1e-6)


def test_iteration_budget_counts_iterations_and_derives_epochs() -> None:
    def recipe(epochs: int, max_iter: int | None = None) -> StageRecipe:
        return StageRecipe("fcn32s", epochs=epochs, lr=1e-3, max_iter=max_iter, at_once=False)

    assert iteration_budget(recipe(3), 4) == (12, 3)
    assert iteration_budget(recipe(3, max_iter=5), 4) == (5, 2)  # epochs ignored
    assert iteration_budget(recipe(1, max_iter=8), 4) == (8, 2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        iteration_budget(recipe(1), 0)


def test_max_iter_budget_cuts_the_last_epoch_and_whole_epochs_match_epochs(
    shards, tmp_path
) -> None:
    """8 images at batch 2: 4 steps per epoch. max_iter 5 trains 5 steps over 2 epochs, the
    poly lr ending where 5 steps end; max_iter 8 is exactly the 2-epoch run, weight for weight."""
    lr = 0.01

    def run(tag: str, **budget: int) -> dict:
        cfg = base_cfg(fcn32s={"lr": lr, "epochs": 1, **budget})
        return run_train("fcn32s", cfg, shards["small"], shards["val"], tmp_path / tag)

    cut = run("cut", max_iter=5)
    assert cut["iterations"] == 5
    assert [h["epoch"] for h in cut["history"]] == [1, 2]
    assert cut["history"][-1]["lr"] == pytest.approx(lr * lr_factor("poly", 4, 5))
    assert "val/mean_iou" in cut["history"][-1]  # the last (short) epoch is validated

    whole, epochs = run("whole", max_iter=8), run("epochs", epochs=2)
    assert whole["iterations"] == epochs["iterations"] == 8
    a = state_dict(tmp_path / "whole" / "fcn32s.pt")
    b = state_dict(tmp_path / "epochs" / "fcn32s.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_validation_due_every_n_iterations_inside_epochs_only() -> None:
    assert [i for i in range(1, 13) if validation_due(i, 12, 5)] == [5, 10]
    assert not validation_due(8, 8, 4)  # the epoch's end scores it (its own entry)
    assert not any(validation_due(i, 12, None) for i in range(1, 13))


def test_validation_scores_through_evaluate_model_and_leaves_mode_and_rng_alone() -> None:
    """Training-time validation is the evaluate stage's scoring (the same matrix), restores the
    model's mode, and draws nothing from the global RNG (its loader has a generator of its own), so
    dropout after a validation is what it would have been without one."""
    from pipeline.evaluation.score import evaluate_model
    from pipeline.training.validation import validate

    model = _tiny_fcn()
    gen = torch.Generator().manual_seed(0)
    data = []
    for h, w in ((64, 80), (70, 70), (33, 120)):
        y = torch.randint(0, 21, (h, w), generator=gen)
        y[: h // 4] = 255
        data.append((torch.randn(3, h, w, generator=gen), y))
    cpu = torch.device("cpu")
    model.train()
    before = torch.get_rng_state()
    scores = validate(model, data, cpu, None, channels_last=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    hist = evaluate_model(
        model, data, device=cpu, precision=None, channels_last=False, progress=False
    )
    assert scores == segmentation_scores(hist) or str(scores) == str(segmentation_scores(hist))


def test_val_every_iter_scores_inside_epochs_without_changing_training(shards, tmp_path) -> None:
    """4 steps per epoch, 2 epochs, validation every 3 iterations: entries at iterations
    3, 4 (epoch end), 6, 8 (epoch end), each with val scores and the loss of its own steps;
    the weights equal a run that validates only at epoch ends (validation draws no randomness
    and changes no state)."""

    def run(tag: str, val_every_iter: int | None) -> dict:
        cfg = base_cfg(val_every_iter=val_every_iter, fcn32s={"lr": 0.01, "epochs": 2})
        return run_train("fcn32s", cfg, shards["small"], shards["val"], tmp_path / tag)

    often, plain = run("often", 3), run("plain", None)
    assert [h["iteration"] for h in often["history"]] == [3, 4, 6, 8]
    assert [h["epoch"] for h in often["history"]] == [1, 1, 2, 2]
    assert all("val/mean_iou" in h for h in often["history"])
    assert [h["iteration"] for h in plain["history"]] == [4, 8]
    # a logged loss is the mean over the steps since the previous point (3 steps, then 1)
    mid, end = often["history"][0]["train/loss"], often["history"][1]["train/loss"]
    assert plain["history"][0]["train/loss"] == pytest.approx((3 * mid + end) / 4, rel=1e-9)
    a = state_dict(tmp_path / "often" / "fcn32s.pt")
    b = state_dict(tmp_path / "plain" / "fcn32s.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_at_once_fcn8s_trains_from_vgg16_and_saves_its_own_arch(shards, tmp_path) -> None:
    """train.fcn8s.at_once: the fcn8s stage starts from the VGG16 weights (no FCN-16s file),
    trains the net with fixed skip scales, and the model file says so."""
    from pipeline.models.fcn import FCN8sAtOnce, load_model
    from pipeline.models.surgery import random_vgg16_state_dict

    vgg = tmp_path / "vgg16.pth"
    width = 0.0625
    torch.save(random_vgg16_state_dict(width=width, seed=3), vgg)
    cfg = base_cfg(fcn8s={"epochs": 1, "lr": 0.01, "at_once": True})
    cfg["model"].update(backbone_init="vgg16")
    out = run_train("fcn8s", cfg, shards["small"], shards["val"], tmp_path, vgg16_path=vgg)
    assert out["iterations"] == 4
    model = load_model(tmp_path / "fcn8s.pt")
    assert type(model) is FCN8sAtOnce
    served = torch.load(vgg, weights_only=True)["features.0.weight"]
    moved = model.state_dict()["features.0.weight"]
    assert moved.shape == served.shape and not torch.equal(moved, served)  # trained from it
    assert torch.nn.functional.cosine_similarity(moved.flatten(), served.flatten(), 0) > 0.9


@pytest.mark.parametrize("learn", [False, True])
def test_learn_upsampling_false_keeps_every_upsampling_bilinear(shards, tmp_path, learn) -> None:
    """train.learn_upsampling: false is the release (every Deconvolution at lr_mult 0): after
    training FCN-8s the upsampling layers are still exactly bilinear while the rest learned;
    true (the paper's text) moves its 2x layers, and the final 8x stays fixed either way."""
    from pipeline.models.surgery import bilinear_kernel

    cfg = base_cfg(learn_upsampling=learn, fcn8s={"epochs": 1, "lr": 0.01}, val_every=1000)
    run_train("fcn8s", cfg, shards["small"], shards["val"], tmp_path)
    weights = state_dict(tmp_path / "fcn8s.pt")
    moved = {}
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        w = weights[f"{name}.weight"]
        moved[name] = not torch.equal(w, bilinear_kernel(w.shape[0], w.shape[1], w.shape[2]))
    assert moved == {"upscore2": learn, "upscore_pool4": learn, "upscore8": False}, moved
    assert weights["score_fr.weight"].any()  # the rest trained: score_fr starts at zero


# --- 5. checkpoints that must not be resumed --------------------------------------------------


def _store(cfg: dict[str, Any], shards: dict[str, Path], out: Path) -> ResumeStore:
    """The resume store `run_train("fcn32s", cfg, shards["small"], shards["val"], out)` uses."""
    inputs = RunInputs.of_stage(
        "fcn32s", cfg, init_path=None, train_dir=shards["small"], val_dir=shards["val"]
    )
    return ResumeStore(out / "resume" / "fcn32s", inputs)


def test_pickled_or_foreign_checkpoints_are_not_resumed(shards, tmp_path, capsys) -> None:
    cfg = base_cfg(fcn32s={"epochs": 1, "lr": 0.01})
    ref = run_train("fcn32s", cfg, shards["small"], shards["val"], tmp_path / "ref")
    assert ref["iterations"] == 4
    store = _store(cfg, shards, tmp_path / "ref")
    assert not store.slot.exists(), "a completed run keeps no resume state"
    # the resume state the loop writes at the end of its last epoch, rebuilt from the real model
    model = load_model(tmp_path / "ref" / "fcn32s.pt")
    state = ResumeState(
        fingerprint=store.fingerprint,
        model=model.state_dict(),
        optimizer=make_optimizer(model, 0.01, 0.9, 5e-4).state_dict(),
        epoch=1,
        iteration=4,
        history=ref["history"],
        epoch_losses=[],
        scores=ref["scores"],
        rng=[rng_state()],
    )
    ref_ckpt = tmp_path / "genuine" / CHECKPOINT_NAME
    ref_ckpt.parent.mkdir()
    torch.save(state.to_dict(), ref_ckpt)
    assert load_checkpoint(ref_ckpt, state.fingerprint) is not None  # the genuine one loads
    capsys.readouterr()

    # (a) that state with a pickled object added, where the run looks: refused, never executed
    evil = _store(cfg, shards, tmp_path / "evil")
    evil.checkpoint_path.parent.mkdir(parents=True)
    marker = tmp_path / "pickle-was-executed"
    torch.save({**state.to_dict(), "extra": PlantedCode(marker)}, evil.checkpoint_path)
    with pytest.raises(pickle.UnpicklingError):  # what a weights-only reader must hit
        torch.load(evil.checkpoint_path, weights_only=True)
    assert evil.load() is None
    assert "ignoring unreadable checkpoint" in capsys.readouterr().out
    assert not marker.exists()
    # train() starts fresh (had it resumed the finished state it would run 0 iterations)
    again = run_train("fcn32s", cfg, shards["small"], shards["val"], tmp_path / "evil")
    out = capsys.readouterr().out
    assert "ignoring unreadable checkpoint" in out and "random initialisation" in out, out
    assert "resuming" not in out and not marker.exists()
    assert again["iterations"] == 4
    assert_same_weights(tmp_path / "ref" / "fcn32s.pt", tmp_path / "evil" / "fcn32s.pt")

    # (b) a genuine resume state of other params (another lr): not resumed, the run starts
    # over and names the key that differs; the other state is kept
    other = base_cfg(fcn32s={"epochs": 1, "lr": 0.02})
    foreign = _store(cfg, shards, tmp_path / "foreign")
    foreign.save(state)
    result = run_train("fcn32s", other, shards["small"], shards["val"], tmp_path / "foreign")
    out = capsys.readouterr().out
    assert f"not resuming the interrupted run in {foreign.slot}" in out, out
    assert "train.fcn32s.lr: 0.01 -> 0.02" in out, out
    assert "resuming from" not in out and result["iterations"] == 4
    assert foreign.checkpoint_path.exists()
    fresh = run_train("fcn32s", other, shards["small"], shards["val"], tmp_path / "fresh")
    assert fresh["iterations"] == 4
    assert_same_weights(tmp_path / "foreign" / "fcn32s.pt", tmp_path / "fresh" / "fcn32s.pt")
    # and it is not the reference run either (the lr change mattered)
    sr, sf = (
        state_dict(tmp_path / "ref" / "fcn32s.pt"),
        state_dict(tmp_path / "foreign" / "fcn32s.pt"),
    )
    assert not torch.equal(sr["score_fr.weight"], sf["score_fr.weight"])

    # (c) back to lr 0.01: the kept state resumes with no epoch left, writes the model and
    # reports the scores it saved, without training
    back = run_train("fcn32s", cfg, shards["small"], shards["val"], tmp_path / "foreign")
    out = capsys.readouterr().out
    assert f"resuming from {foreign.checkpoint_path} at iteration 4" in out, out
    assert "4 iterations (0 in this run)" in out, out
    assert back["scores"] == ref["scores"] and back["history"] == ref["history"]
    assert_same_weights(tmp_path / "ref" / "fcn32s.pt", tmp_path / "foreign" / "fcn32s.pt")
    assert not foreign.slot.exists()


# --- 6. the summed loss, fp16 scaling, NaN read-back ------------------------------------------


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_summed_loss_update_is_per_image_whatever_batch_accumulation_or_ranks() -> None:
    """`loss: sum` follows the Caffe solver: the update is the per-image summed loss averaged
    over the step's images, whether they come as one batch of 4, 4 accumulated micro-batches
    of 1, or 2 ranks of 2 (DDP averages the ranks' gradients)."""
    from pipeline.training.solver import step_normaliser
    from pipeline.training.start import set_dropout
    from pipeline.training.step import forward_backward

    torch.manual_seed(0)
    model, _ = build_initial_model(
        "fcn32s", width=0.0625, backbone_init="random", vgg16_path=None, init_from=None, seed=0
    )
    set_dropout(model, 0.0)  # the same network for every split of the batch
    for p in model.parameters():  # score_fr starts at zero: make every layer pass gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.double()  # float64: the gradients of the first layers are sums that cancel a lot
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 21, (4, 64, 64))
    y[:, :8] = 255  # some ignored pixels
    cpu = torch.device("cpu")

    def grads_of(chunks: list[tuple[torch.Tensor, torch.Tensor]], world: int = 1):
        model.zero_grad(set_to_none=True)
        norm = step_normaliser([t for _, t in chunks], "sum", world, cpu)
        for xb, yb in chunks:
            forward_backward(model, xb, yb, norm, cpu, None, False)
        return _grads(model)

    one_batch = grads_of([(x, y)])
    accumulated = grads_of([(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    rank0, rank1 = grads_of([(x[:2], y[:2])], world=2), grads_of([(x[2:], y[2:])], world=2)
    per_image = [grads_of([(x[i : i + 1], y[i : i + 1])]) for i in range(4)]
    for k in one_batch:
        expected = sum(g[k] for g in per_image) / 4
        scale = float(expected.abs().max())
        assert scale > 0, k  # every layer gets gradient: the comparison is not vacuous
        for name, got in (
            ("batch 4", one_batch[k]),
            ("accumulate 4", accumulated[k]),
            ("2 ranks", (rank0[k] + rank1[k]) / 2),
        ):
            err = float((got - expected).abs().max())
            assert err <= 1e-4 * scale, (k, name, err, scale)


def test_fp16_gets_loss_scaling_and_bf16_fp32_do_not() -> None:
    from pipeline.device import grad_scaler

    cpu = torch.device("cpu")
    assert grad_scaler(cpu, torch.float16).is_enabled()
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not grad_scaler(cpu, None).is_enabled()


def test_a_non_finite_loss_is_caught_at_read_back_naming_its_iteration() -> None:
    from pipeline.training.step import LOSS_READBACK_EVERY, LossReadback

    readback = LossReadback("fcn32s", "sum", world=1)
    for i in range(LOSS_READBACK_EVERY):
        readback.add(torch.tensor(float("nan") if i == 7 else 1.0), 100 + i)
    with pytest.raises(FloatingPointError, match="at iteration 107; lower train.fcn32s.lr"):
        readback.flush()


# --- 7. throughput settings: SGD kernels, torch.compile, the torchrun command -------------------


def _tiny_fcn() -> torch.nn.Module:
    from pipeline.training.start import set_dropout

    model, _ = build_initial_model(
        "fcn32s", width=0.0625, backbone_init="random", vgg16_path=None, init_from=None, seed=0
    )
    set_dropout(model, 0.0)  # the same function on every call
    return model


def test_cpu_optimizer_uses_foreach_and_updates_like_the_per_parameter_loop() -> None:
    from pipeline.training.solver import param_groups, set_lr

    model = _tiny_fcn()
    for p in model.parameters():  # score_fr starts at zero: give every weight a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    fast = make_optimizer(model, 0.01, 0.9, 5e-4)  # device inferred from the parameters
    assert fast.defaults["foreach"] is True and not fast.defaults["fused"]
    assert all(g["foreach"] is True for g in fast.param_groups)
    assert make_optimizer(model, 0.01, 0.9, 5e-4, torch.device("cpu")).defaults["foreach"]
    loop = torch.optim.SGD(param_groups(reference, 5e-4), momentum=0.9, foreach=False)
    set_lr(loop, 0.01)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 21, (2, 64, 64))
    for m, opt in ((model, fast), (reference, loop)):
        for _ in range(2):  # the second step uses the momentum buffers
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    moved = 0
    for (name, a), b, c in zip(
        model.named_parameters(), reference.parameters(), start.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        moved += int(not torch.equal(a, c))
    assert moved > 0  # the steps changed the weights: the comparison is not vacuous


def test_score_layers_learn_at_score_lr_mult_times_the_rate_and_keep_it_under_set_lr() -> None:
    from pipeline.models.surgery import is_score_layer
    from pipeline.training.solver import set_lr

    model = _tiny_fcn()
    opt = make_optimizer(model, 0.01, 0.9, 5e-4, score_lr_mult=10)
    seen = set()
    for lr in (None, 0.003):  # as built, then after the schedule sets a new base rate
        if lr is not None:
            set_lr(opt, lr)
        base = 0.01 if lr is None else lr
        for group in opt.param_groups:
            for p in group["params"]:
                name = next(n for n, q in model.named_parameters() if q is p)
                want = (
                    base * (10 if is_score_layer(name) else 1) * (2 if name.endswith("bias") else 1)
                )
                assert group["lr"] == pytest.approx(want), name
                assert group["weight_decay"] == (0.0 if name.endswith("bias") else 5e-4), name
                seen.add(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen == trainable  # every trainable parameter in exactly the groups checked
    assert {"score_fr.weight", "score_fr.bias"} <= seen


def test_resumed_optimizer_gets_this_devices_kernels_back() -> None:
    from pipeline.training.solver import use_sgd_implementation

    model = _tiny_fcn()
    opt = make_optimizer(model, 0.01, 0.9, 5e-4)
    # a checkpoint saved before the flags were set (foreach None), or on another device
    for saved in ({"foreach": None, "fused": None}, {"foreach": None, "fused": True}):
        groups = [dict(g, **saved) for g in opt.state_dict()["param_groups"]]
        opt.load_state_dict({"state": {}, "param_groups": groups})
        assert all(g["foreach"] is None for g in opt.param_groups)  # what load_state_dict does
        use_sgd_implementation(opt, torch.device("cpu"))
        assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)


def test_compile_false_leaves_the_model_uncompiled_and_true_wraps_it(monkeypatch) -> None:
    from pipeline.training.recipe import train_config
    from pipeline.training.step import training_module

    cfg = load_params(REPO / "params.yaml")
    assert cfg["train"]["compile"] is False  # the shipped default
    model, cpu = _tiny_fcn(), torch.device("cpu")
    assert training_module(model, cpu, False, train_config(cfg).compile) is model
    compiled: list[torch.nn.Module] = []

    def fake_compile(module: torch.nn.Module) -> str:  # torch.compile itself takes minutes
        compiled.append(module)
        return "compiled"

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert training_module(model, cpu, False, compile_step=True) == "compiled"
    assert compiled == [model]


def _tc(**overrides: Any):
    """The shipped sample profile's typed train section, with `overrides`."""
    from pipeline.training.recipe import train_config

    cfg = load_params(REPO / "params.yaml")
    cfg["train"].update(overrides)
    return train_config(cfg)


def test_torchrun_command_one_node_is_standalone() -> None:
    from pipeline.training.launch import needs_torchrun, torchrun_command

    cmd = torchrun_command(_tc(nproc=4), ["fcn8s", "--no-progress"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and not any(a.startswith("--nnodes") for a in cmd)
    assert cmd[-5:] == ["--nproc-per-node=4", "-m", "stages.train", "fcn8s", "--no-progress"]
    assert needs_torchrun(_tc(nproc=4)) and not needs_torchrun(_tc(nproc=1))
    assert needs_torchrun(_tc(nproc=1, nnodes=2, rdzv_endpoint="node0:29400"))


def test_torchrun_command_several_nodes_meet_at_node_zero() -> None:
    from pipeline.config import ParamsError
    from pipeline.training.launch import torchrun_command

    tc = _tc(nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="node0.cluster:29400")
    cmd = torchrun_command(tc, ["fcn32s"])
    assert "--standalone" not in cmd
    launcher = cmd[3 : cmd.index("-m", 3)]
    assert launcher == [
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=static",
        "--rdzv-endpoint=node0.cluster:29400",
        "--nproc-per-node=8",
    ]
    # the rendezvous is checked once, where the params are read: no command is ever built
    with pytest.raises(ParamsError, match="train.rdzv_endpoint: must be set"):
        _tc(nproc=8, nnodes=2, node_rank=1)
    with pytest.raises(ParamsError, match="train.node_rank: 2 is not below train.nnodes 2"):
        _tc(nproc=8, nnodes=2, node_rank=2, rdzv_endpoint="node0.cluster:29400")


def test_the_stage_refuses_several_nodes_without_an_endpoint(tmp_path) -> None:
    """The params check names the key, before any data is read or any process launched."""
    write_tiny_params(tmp_path / "params.yaml", {"train.nnodes": 2})
    p = subprocess.run(
        [sys.executable, "-m", "stages.train", "fcn32s", "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "train.rdzv_endpoint: must be set" in p.stderr, p.stderr[-2000:]
    assert "torch.distributed.run" not in p.stdout
