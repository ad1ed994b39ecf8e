"""Gradient checkpointing (transformers' gradient_checkpointing_enable) with LoRA layers."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import assert_same_lora_grads, injected_like, peft_lora, tiny_llama, tokens

import peftkern

QV = ("q_proj", "v_proj")


def train_step_grads(model, x, seed=7):
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_injected_model_has_the_same_grads(dropout, monkeypatch):
    """With dropout, recomputation must draw the same mask: the seed comes from torch's
    generator, whose state the checkpoint restores."""
    base = tiny_llama()
    plain = injected_like(base, peft_lora(base, QV), QV, r=4, lora_alpha=8, lora_dropout=dropout)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = tokens()
    calls = []
    fused = peftkern.nn.lora.lora_linear
    monkeypatch.setattr(peftkern.nn.lora, "lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.testing.assert_close(
        train_step_grads(checkpointed, x), train_step_grads(plain, x), rtol=1e-6, atol=1e-6
    )
    assert len(calls) == 3 * 4  # 4 LoRA layers: twice with checkpointing (recomputed), once without
    assert_same_lora_grads(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_checkpointed_patched_and_injected_equal_checkpointed_peft():
    base = tiny_llama()
    ref = peft_lora(base, QV)
    injected = injected_like(base, ref, QV, r=4, lora_alpha=8)
    patched = copy.deepcopy(ref)
    assert peftkern.patch_peft(patched).num_patched == 4
    for model in (ref, injected, patched):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = tokens()
    loss = train_step_grads(ref, x)
    for model in (injected, patched):
        torch.testing.assert_close(train_step_grads(model, x), loss, rtol=1e-6, atol=1e-6)
        assert_same_lora_grads(model, ref, rtol=1e-5, atol=1e-6)
