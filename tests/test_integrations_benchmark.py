"""The training-step benchmark runs, and its exact metric (saved activations) shows the saving."""

from __future__ import annotations

import torch

from peftkern.benchmarking import training_step

TINY = training_step.StepCase(32, 2, 4, 64, 97, 16, 2, 4, 0.1, torch.float32, "cpu")


def test_training_step_benchmark_runs_and_patched_saves_less():
    results = {r.provider: r for r in training_step.run(TINY, rounds=1, warmup=0)}
    assert set(results) == {
        "peft",
        "peftkern-patched",
        "peftkern-injected",
        "peftkern-patched+attention",
        "frozen-base",
    }
    assert results["peft"].ratio_to_floor == 1.0
    # Without adapters nothing of theirs is kept: the floor saves less than any method.
    assert results["frozen-base"].saved_bytes < results["peftkern-patched"].saved_bytes
    # peft keeps dropout(x) for its LoRA branch; the fused op regenerates the mask from a seed.
    assert results["peftkern-patched"].saved_bytes < results["peft"].saved_bytes
    assert results["peftkern-injected"].saved_bytes == results["peftkern-patched"].saved_bytes
    # The flash kernel keeps q, k, v, out and lse, as SDPA's does.
    assert results["peftkern-patched+attention"].saved_bytes == results["peftkern-patched"].saved_bytes


def test_prefix_training_step_benchmark_runs_and_patched_saves_less():
    tiny_prefix = training_step.StepCase(32, 2, 4, 64, 97, 16, 2, 0, 0.0, torch.float32, "cpu", prefix=3)
    results = {r.provider: r for r in training_step.run(tiny_prefix, rounds=1, warmup=0)}
    assert set(results) == {"peft", "peftkern-patched", "peftkern-injected", "frozen-base"}
    assert "prefix m3" in tiny_prefix.name
    # peft concatenates [P_K; K] and [P_V; V] (expanded over the batch) and keeps them; the
    # prefix attention keeps its inputs only.
    assert results["peftkern-patched"].saved_bytes < results["peft"].saved_bytes
