"""The DoRA benchmark suite on tiny shapes: every provider runs, and the saved-activation
bytes (exact, not a timing) are what docs/dora.md states."""

from __future__ import annotations

import pytest

from peftkern.benchmarking import dora_linear


def test_quick_suite_runs_every_provider_and_saves_less_than_peft():
    pytest.importorskip("peft")
    (case,) = dora_linear.quick_cases()
    results = dora_linear.run([case], rounds=1, with_compile=False)
    saved = {r.provider: r.saved_bytes for r in results if r.mode == "forward+backward"}
    assert set(saved) == {"frozen-linear", "peftkern-lora", "peftkern-dora", "peft-dora"}
    M, K, N, r = case.rows, case.in_features, case.out_features, case.r
    # x, S = x_d·Aᵀ, z = x_d·Wᵀ + s·S·Bᵀ and the norm, float32; the seed is one int64.
    assert saved["peftkern-dora"] == 4 * (M * K + M * r + M * N + N) + 8
    assert saved["peftkern-dora"] < 0.6 * saved["peft-dora"]
