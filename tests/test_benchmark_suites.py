"""Every kernel benchmark suite runs end to end on its quick shapes through the one interface
that `peftkern bench` and the benchmarks/bench_*.py scripts use."""

from __future__ import annotations

import importlib

import pytest

from peftkern.benchmarking import suites
from peftkern.benchmarking.harness import MODES


@pytest.mark.parametrize("name", sorted(suites.SUITES))
def test_suite_runs_its_quick_cases(name):
    suite = importlib.import_module(suites.SUITES[name])
    cases = suite.quick_cases()
    results = suite.run(cases, rounds=1, with_compile=False)
    providers = {r.provider for r in results}
    assert any(p.startswith("peftkern") for p in providers) and len(providers) >= 2
    modes = {r.mode for r in results}
    assert "forward+backward" in modes and modes <= set(MODES)
    assert len(results) == len(cases) * len(providers) * len(modes)
    floors = [r for r in results if r.ratio_to_floor == pytest.approx(1.0)]
    assert len(floors) >= len(cases) * len(modes)  # the floor provider, in every mode
    assert all(r.median_ms > 0 and r.saved_bytes >= 0 for r in results)
