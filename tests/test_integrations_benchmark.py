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


TINY_DORA = training_step.StepCase(32, 2, 4, 64, 97, 16, 2, 4, 0.1, torch.float32, "cpu", dora=True)


def test_dora_training_step_models_agree_and_patched_saves_less():
    models = training_step.build_models(TINY_DORA)
    input_ids = torch.randint(0, TINY_DORA.vocab, (TINY_DORA.batch, TINY_DORA.seq))
    with torch.no_grad():  # eval: no dropout, so peft, patched and injected compute the same
        losses = {n: m.eval()(input_ids=input_ids, labels=input_ids).loss for n, m in models.items()}
    for name in ("peftkern-patched", "peftkern-injected"):
        torch.testing.assert_close(losses[name], losses["peft"], msg=name)
    assert "dora4" in TINY_DORA.name
    results = {r.provider: r for r in training_step.run(TINY_DORA, rounds=1, warmup=0)}
    assert results["peftkern-patched"].saved_bytes < results["peft"].saved_bytes
    assert results["peftkern-injected"].saved_bytes == results["peftkern-patched"].saved_bytes
