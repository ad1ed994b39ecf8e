"""The kernel benchmark suites `peftkern bench` runs, one line each.

A suite is a module in this package with
    default_cases() -> list       cases sized for the machine at hand (GPU if present, else CPU)
    quick_cases() -> list         tiny shapes, for tests and a quick look
    run(cases, *, rounds: int, with_compile: bool) -> list[harness.Result]
"""

from __future__ import annotations

import importlib

from peftkern.benchmarking.harness import Result

SUITES: dict[str, str] = {
    "lora_linear": "peftkern.benchmarking.lora_linear",
    "bottleneck_adapter": "peftkern.benchmarking.bottleneck_adapter",
    "prefix_attention": "peftkern.benchmarking.prefix_attention",
    "linear_cross_entropy": "peftkern.benchmarking.linear_cross_entropy",
    "dora_linear": "peftkern.benchmarking.dora_linear",
}


def run_suites(names: list[str], *, quick: bool, rounds: int, with_compile: bool) -> list[Result]:
    """Runs the named suites (all of them when `names` is empty); unknown names are the
    caller's to reject (see `SUITES`)."""
    results: list[Result] = []
    for name in names or list(SUITES):
        suite = importlib.import_module(SUITES[name])
        cases = suite.quick_cases() if quick else suite.default_cases()
        results += suite.run(cases, rounds=rounds, with_compile=with_compile)
    return results
