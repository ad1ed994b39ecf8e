"""A short transformers.Trainer run with a patched peft model matches the unpatched run."""

from __future__ import annotations

import copy

import torch
from lora_models import QUIET_CPU_TRAINING, VOCAB, lora_factors, peft_lora, tiny_llama
from transformers import Trainer, TrainingArguments

import peftkern

QV = ("q_proj", "v_proj")


def dataset(n: int = 8, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    # A repeated pattern the adapters can learn quickly, so the loss visibly falls.
    g = torch.Generator().manual_seed(3)
    rows = [torch.arange(seq) * (i + 1) % VOCAB for i in range(n)]
    rows = [
        torch.where(torch.rand(seq, generator=g) < 0.1, torch.randint(0, VOCAB, (seq,), generator=g), r)
        for r in rows
    ]
    return [{"input_ids": r, "labels": r} for r in rows]


def test_patched_trainer_run_matches_peft_step_by_step(tmp_path):
    ref = peft_lora(tiny_llama(), QV, task_type="CAUSAL_LM")
    patched = copy.deepcopy(ref)
    assert peftkern.patch_peft(patched).num_patched == 4
    initial = {k: v.clone() for k, v in lora_factors(ref).items()}
    losses = {}
    for name, model in (("peft", ref), ("patched", patched)):
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=2e-2,
            **QUIET_CPU_TRAINING,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset())
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses["peft"]) == 6
    assert losses["patched"][-1] < losses["patched"][0]
    # Trainer logs losses rounded to 4 digits; the trained weights compare to fp32 precision.
    torch.testing.assert_close(
        torch.tensor(losses["patched"]), torch.tensor(losses["peft"]), rtol=0, atol=2e-4
    )
    trained, expected = lora_factors(patched), lora_factors(ref)
    assert not any(torch.equal(expected[k], initial[k]) for k in expected)  # training moved every factor
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5)
