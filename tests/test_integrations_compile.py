"""torch.compile of an injected (or patched) model: no graph break from peftkern, and it trains.
Batches carry a padding mask, as a Trainer with a padding collator passes one."""

from __future__ import annotations

import pytest
import torch
from lora_models import peft_lora, tiny_llama, tiny_llama_with, tokens

import peftkern

QV = ("q_proj", "v_proj")
# Tracing costs seconds per model, so each method variant is traced once or twice: explain()
# lists every break, fullgraph=True in the compiled training fails on the first one. The prefix
# with and without its MLP share the attention path; Pfeiffer on Llama is Houlsby's hook at
# fewer places.
TRACED = ("lora", "houlsby", "prefix")
TRAINED = ("lora", "houlsby", "prefix-mlp")
# Dropout draws random numbers inside the traced graph, a classic source of graph breaks.
TRACE_OPTIONS = {"lora": {"lora_dropout": 0.1}, "houlsby": {"dropout": 0.1}}


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens, the second padded after 9; padding is not a label."""
    x = tokens(batch=2, seq=12, seed=seed)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    return {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}


def break_reasons(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**batch)
    return [f"{b.reason} at {b.user_stack[-1:] if b.user_stack else ''}" for b in explanation.break_reasons]


@pytest.mark.parametrize("method", TRACED)
def test_injected_llama_traces_as_one_graph(method):
    model = tiny_llama_with(method, **TRACE_OPTIONS.get(method, {}))
    assert break_reasons(model, padded_batch()) == []


def test_patched_peft_model_traces_as_one_graph():
    model = peft_lora(tiny_llama(), QV, lora_dropout=0.1).train()
    peftkern.patch_peft(model)
    assert break_reasons(model, padded_batch()) == []


def train_losses(model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = model(**padded_batch(seed=step % 2)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", TRAINED)
def test_compiled_injected_model_trains_like_eager(method):
    """fullgraph=True: forward and backward through AOT autograd in one graph. The aot_eager
    backend keeps the test fast; inductor code generation for the ops is covered in test_compile.
    Two equal builds rather than a deep copy: an inject_prefix model cannot be copied."""
    eager, compiled_model = tiny_llama_with(method), tiny_llama_with(method)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    expected = train_losses(eager, list(eager.parameters()))
    losses = train_losses(compiled, list(compiled_model.parameters()))
    assert losses[2] < losses[0]  # same batch two steps later
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_compiled_prefix_model_still_refuses_a_mask_that_is_not_padding():
    """Traced, the mask check runs inside the graph (a Python branch on its value would break
    it), so a custom mask is still an error rather than silently read as padding."""
    model = tiny_llama_with("prefix")
    x = tokens(batch=1, seq=4)
    not_causal = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="not a padding mask plus the causal triangle"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=x, attention_mask=not_causal)
