"""merge_and_unload: LoRA folded into the base weights, modules back to nn.Linear."""

from __future__ import annotations

import pytest
import torch
from lora_models import injected_like, peft_lora, tiny_llama, tokens
from torch import nn

import peftkern

QV = ("q_proj", "v_proj")


def test_merge_and_unload_matches_adapter_and_peft():
    base = tiny_llama()
    ref = peft_lora(base, QV).eval()
    model = injected_like(base, ref, QV, r=4, lora_alpha=8).eval()
    x = tokens()
    expected = model(x).logits
    layer = model.model.layers[0].self_attn.q_proj
    merged_weight = layer.weight + layer.delta_weight()
    assert peftkern.merge_and_unload(model) is model
    assert not any(isinstance(m, peftkern.LoRALinear) for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and not q.weight.is_meta
    torch.testing.assert_close(q.weight, merged_weight)
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x).logits, ref.merge_and_unload()(x).logits, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())  # a plain model again


def test_merge_and_unload_of_a_single_layer_returns_a_linear():
    layer = peftkern.LoRALinear(8, 4, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = layer(x)
    linear = peftkern.merge_and_unload(layer)
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("already_merged", [False, True])
def test_merge_and_unload_does_not_merge_twice(already_merged):
    model = tiny_llama()
    peftkern.inject_lora(model, QV)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.normal_()
    expected = q.weight + q.delta_weight()
    if already_merged:
        q.merge()
    peftkern.merge_and_unload(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected)
