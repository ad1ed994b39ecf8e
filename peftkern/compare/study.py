"""The grid `peftkern compare` runs for each method: training-set sizes x seeds, with the
learning rate either the method's own or chosen from a small sweep, and the runs of one
(method, size) summarised into the one record the report and the JSON show."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from peftkern.compare.train import MethodResult
from peftkern.errors import UsageError

LR_MODES = ("default", "sweep")
# Around each method's default, a factor of 3 apart: wide enough that the best of the three
# says which side of the default a method prefers at a given data size.
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


@dataclass(frozen=True)
class Grid:
    train_sizes: tuple[int, ...] | None = None  # None: the task's whole training split
    seeds: int = 1  # seeds seed, seed+1, ... per (method, size)
    lr_mode: str = "default"


@dataclass(frozen=True)
class Study:
    """`peftkern compare --study`: the preset that fills in the source's table."""

    grid: Grid
    epochs: int
    patience: int


# Sizing, for the default MiniLM (batch 16, 40 tokens) on an idle 2-core AMD EPYC, from the
# times per step of a first study run there: a training step costs about 1.6 s summed over the
# seven methods (head-only 0.11 s, LoRA 0.20 s, ..., full fine-tuning the most). Per method and
# size the sweep makes 3 runs (one per rate, first seed) and the two other seeds 2 more: 5 runs.
# 5 epochs of (64 + 256 + 768) / 16 = 68 steps over the three sizes: 5 x 5 x 68 = 1700 steps,
# and evaluation (validation every epoch, train and test once per run) about 17 % more:
# 1700 x 1.17 x 1.6 s = 53 min, and 105 model loads add about 3: 56 min when nothing stops
# early. Five epochs with patience 2 leave room to stop early (an early stop needs its best
# epoch by the third), which head-only and full fine-tuning do on the small sets.
STUDY = Study(grid=Grid(train_sizes=(64, 256, 768), seeds=3, lr_mode="sweep"), epochs=5, patience=2)


def check_grid(grid: Grid) -> None:
    if grid.train_sizes is not None:
        if not grid.train_sizes:
            raise UsageError("--train-sizes needs at least one size")
        if min(grid.train_sizes) < 1:
            raise UsageError(f"--train-sizes: every size must be at least 1, got {min(grid.train_sizes)}")
    if grid.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {grid.seeds}")
    if grid.lr_mode not in LR_MODES:
        raise UsageError(f"unknown --lr mode {grid.lr_mode!r}; known: {', '.join(LR_MODES)}")


def learning_rates(default: float, mode: str) -> list[float]:
    return [default * f for f in SWEEP_FACTORS] if mode == "sweep" else [default]


def _loss_key(run: MethodResult) -> float:
    return run.val_loss if math.isfinite(run.val_loss) else math.inf


def measure(
    default_lr: float, grid: Grid, first_seed: int, train: Callable[[float, int], MethodResult]
) -> tuple[list[MethodResult], list[MethodResult]]:
    """Runs `train(lr, seed)` over the grid of one (method, size). Returns (the runs at the chosen
    learning rate, one per seed; every run made). The sweep trains each rate with the first seed
    and keeps the one of lowest validation loss; the other seeds train at that rate only."""
    tried = [train(lr, first_seed) for lr in learning_rates(default_lr, grid.lr_mode)]
    chosen = min(tried, key=_loss_key)
    rest = [train(chosen.lr, first_seed + i) for i in range(1, grid.seeds)]
    return [chosen, *rest], tried + rest


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[MethodResult]) -> dict:
    """The record of one (method, size) from its runs at the chosen rate, one per seed:
    accuracies and gaps are means over the seeds; the test accuracy has its (sample) standard
    deviation; ms per step is the median of the runs' medians; memory is the largest seen;
    epochs, best epoch and early stopping are per seed."""
    first = runs[0]
    memory = max((r.memory for r in runs), key=lambda m: m.total)
    test = [r.test_accuracy for r in runs]
    return {
        "method": first.method,
        "train_size": first.train_size,
        "lr": first.lr,
        "trainable": first.trainable_params,
        "share": first.trainable_pct,
        "ms_per_step": statistics.median(r.step_ms for r in runs),
        "peak_memory_mib": memory.mib(),
        "train_acc": statistics.fmean(r.train_accuracy for r in runs),
        "val_acc": statistics.fmean(r.val_accuracy for r in runs),
        "test_acc_mean": statistics.fmean(test),
        "test_acc_std": _std(test),
        "train_val_gap": {
            "accuracy": statistics.fmean(r.train_accuracy - r.val_accuracy for r in runs),
            "loss": statistics.fmean(r.val_loss - r.train_loss for r in runs),
        },
        "epochs": [r.epochs_run for r in runs],
        "best_epoch": [r.best_epoch for r in runs],
        "stopped_early": [r.stopped_early for r in runs],
    }
