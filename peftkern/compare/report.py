"""The comparison as a table, CSV, JSON and a PNG plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from peftkern.compare.train import MethodResult


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def format_table(results: Sequence[MethodResult], title: str) -> str:
    """Fixed-width table; the memory column's header says what it measures."""
    memory = results[0].memory_metric if results else ""
    header = (
        f"{'method':<11} {'trainable':>10} {'share':>8} {'lr':>8} {'ms/step':>9} {'memory MiB':>10} "
        f"{'val acc':>8} {'test acc':>8} {'epochs (best)':>14}"
    )
    lines = [title, header, "-" * len(header)]
    for r in results:
        stop = " early" if r.stopped_early else ""
        lines.append(
            f"{r.method:<11} {_count(r.trainable_params):>10} {r.trainable_pct:7.3f}% {r.lr:8.0e} {r.step_ms:9.1f} "
            f"{r.memory_bytes / 2**20:10.1f} {r.val_accuracy:8.3f} {r.test_accuracy:8.3f} "
            f"{f'{r.epochs_run} ({r.best_epoch}){stop}':>14}"
        )
    lines.append(
        f"memory: {memory}; ms/step: median training step; accuracy of the best epoch (lowest validation loss)"
    )
    return "\n".join(lines)


def write_csv(results: Sequence[MethodResult], path: Path) -> None:
    rows = [asdict(r) for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_json(results: Sequence[MethodResult], path: Path, context: dict) -> None:
    path.write_text(json.dumps({**context, "results": [asdict(r) for r in results]}, indent=2))


def write_plot(results: Sequence[MethodResult], path: Path, title: str) -> bool:
    """Test accuracy against trainable share (log scale), and time per step per method.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        acc.scatter(r.trainable_pct, r.test_accuracy, s=40)
        acc.annotate(r.method, (r.trainable_pct, r.test_accuracy), textcoords="offset points", xytext=(5, 4))
    acc.set_xscale("log")
    acc.set_ylim(0.0, 1.0)
    acc.set_xlabel("trainable parameters (% of the model)")
    acc.set_ylabel("test accuracy")
    acc.grid(alpha=0.3)
    speed.bar([r.method for r in results], [r.step_ms for r in results])
    speed.set_ylabel("ms per training step (median)")
    speed.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
