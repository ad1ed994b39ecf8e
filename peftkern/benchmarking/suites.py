"""The kernel benchmark suites `peftkern bench` runs, one line each.

A suite is a module in this package with
    default_cases() -> list       cases sized for the machine at hand (GPU if present, else CPU)
    quick_cases() -> list         tiny shapes, for tests and a quick look
    run(cases, *, rounds: int, with_compile: bool) -> list[harness.Result]
Suites whose module is not in this build are listed as skipped, not run.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from peftkern.benchmarking.harness import Result

SUITES: dict[str, str] = {
    "lora_linear": "peftkern.benchmarking.lora_linear",
    "bottleneck_adapter": "peftkern.benchmarking.bottleneck_adapter",
    "prefix_attention": "peftkern.benchmarking.prefix_attention",
    "dora_linear": "peftkern.benchmarking.dora_linear",
}


@dataclass
class SuiteRun:
    results: list[Result]
    skipped: dict[str, str]  # suite name -> why it did not run


def present() -> list[str]:
    return [name for name, module in SUITES.items() if importlib.util.find_spec(module) is not None]


def run_suites(names: list[str], *, quick: bool, rounds: int, with_compile: bool) -> SuiteRun:
    """Runs the named suites (all of them when `names` is empty); unknown names are the
    caller's to reject (see `SUITES`)."""
    results: list[Result] = []
    skipped: dict[str, str] = {}
    available = present()
    for name in names or list(SUITES):
        if name not in available:
            skipped[name] = f"{SUITES[name]} is not in this build"
            continue
        suite = importlib.import_module(SUITES[name])
        cases = suite.quick_cases() if quick else suite.default_cases()
        results += suite.run(cases, rounds=rounds, with_compile=with_compile)
    return SuiteRun(results, skipped)
