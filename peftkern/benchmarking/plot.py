"""A PNG of benchmark results: time as a ratio to the floor, per case × mode × provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftkern.benchmarking.harness import Result


def write_plot(results: Sequence[Result], path: str | Path) -> bool:
    """One horizontal bar per (case, mode, provider), grouped by case and mode; the dashed
    line is the floor (1.0). Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    providers = list(dict.fromkeys(r.provider for r in results))
    groups = list(dict.fromkeys((r.case, r.mode) for r in results))
    height = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.2 * len(groups) * len(providers)))
    for i, provider in enumerate(providers):
        ratio = {(r.case, r.mode): r.ratio_to_floor for r in results if r.provider == provider}
        ys = [g - 0.4 + (i + 0.5) * height for g in range(len(groups))]
        ax.barh(ys, [ratio.get(group, 0.0) for group in groups], height=height, label=provider)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(groups)), [f"{case}\n{mode}" for case, mode in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median time / floor median (same run)")
    ax.legend(fontsize=8)
    if results:
        ax.set_title(
            f"{results[0].machine}; torch {results[0].torch}; peftkern {results[0].peftkern}", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
