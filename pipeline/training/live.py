"""DVCLive logging of a training stage: one point per epoch (and per mid-epoch validation).

The points are kept in the resume state's `history`: a resumed run replays them into a fresh
DVCLive logger (`open_live`) and then logs on, so its `dvclive/<model>/` ends up the same as an
uninterrupted run's. In dvc.yaml, `dvclive/<model>/plots` are the stage's plots (the training
curves) and `dvclive/<model>/metrics.json` (the last point: train loss, lr, epoch, step) a cached
output, not a DVC metric: `dvc metrics show` keeps to the headline numbers. `dvcyaml=None`, so
DVCLive declares nothing itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
