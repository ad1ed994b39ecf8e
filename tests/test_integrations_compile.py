"""torch.compile of an injected (or patched) model: no graph break from peftkern, and it trains."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkern
from lora_models import injected_like, peft_lora, tiny_llama, tokens

QV = ("q_proj", "v_proj")


def break_reasons(model, x) -> list[str]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=x, labels=x)
    return [f"{b.reason} at {b.user_stack[-1:] if b.user_stack else ''}" for b in explanation.break_reasons]


def test_injected_llama_traces_as_one_graph():
    model = tiny_llama()
    peftkern.inject_lora(model, QV, r=4, lora_alpha=8, lora_dropout=0.1)
    assert break_reasons(model.train(), tokens()) == []


def test_patched_peft_model_traces_as_one_graph():
    model = peft_lora(tiny_llama(), QV, lora_dropout=0.1).train()
    peftkern.patch_peft(model)
    reasons = break_reasons(model, tokens())
    assert reasons == []


def test_compiled_injected_model_trains_like_eager():
    """fullgraph=True: forward and backward through AOT autograd in one graph. The aot_eager
    backend keeps the test fast; inductor code generation for the op is covered in test_compile."""
    base = tiny_llama()
    eager = injected_like(base, peft_lora(base, QV), QV, r=4, lora_alpha=8).train()
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    losses = {}
    for name, model, params in (("eager", eager, eager.parameters()), ("compiled", compiled, compiled_model.parameters())):
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-2)
        losses[name] = []
        for step in range(4):
            x = tokens(batch=2, seq=12, seed=step % 2)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["compiled"][2] < losses["compiled"][0]  # same batch two steps later
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=1e-5)
