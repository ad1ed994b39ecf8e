"""inject_lora: target matching, freezing, summary, and equality with `peft`."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import (
    LinearHost,
    assert_same_dropout_distribution,
    assert_same_lora_grads,
    injected_like,
    peft_lora,
    tiny_bert,
    tiny_llama,
    tokens,
)

import peftkern


def test_llama_q_v_replaced_frozen_and_summarised():
    model = tiny_llama()
    x = tokens()
    expected = model(x).logits
    summary = peftkern.inject_lora(model, r=4, lora_alpha=8)
    assert summary.replaced == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    layers = [model.get_submodule(n) for n in summary.replaced]
    assert all(isinstance(m, peftkern.LoRALinear) and m.scaling == 2.0 for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in summary.replaced for f in ("lora_A", "lora_B")}
    assert summary.trainable_params == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert f"{summary.trainable_params:,}" in str(summary) and "trainable%" in str(summary)
    torch.testing.assert_close(model(x).logits, expected)  # B = 0: the base model at init


def test_regex_and_suffix_targets_select_the_same_modules():
    by_suffix = peftkern.inject_lora(tiny_llama(), target_modules=["q_proj", "v_proj"]).replaced
    by_regex = peftkern.inject_lora(
        tiny_llama(), target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"
    ).replaced
    assert by_regex == by_suffix
    only_first = peftkern.inject_lora(tiny_llama(), target_modules=r".*layers\.0\..*(q|v)_proj").replaced
    assert only_first == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("target", [["query_key"], "q_proj"])  # a str is a full-match regex, as in peft
def test_target_matching_nothing_lists_linear_names(target):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matches no module.*down_proj.*q_proj.*v_proj"):
        peftkern.inject_lora(model, target_modules=target)
    assert all(p.requires_grad for p in model.parameters())  # untouched
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_modules": ["self_attn"]}, "matches 'model.layers.0.self_attn', a LlamaAttention"),
        ({"target_modules": "(["}, "not a valid regular expression"),
        ({"target_modules": []}, "non-empty list"),
        ({"r": 0}, "r \\(the LoRA rank\\)"),
    ],
)
def test_bad_arguments_are_refused_and_model_unchanged(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        peftkern.inject_lora(model, **kwargs)
    assert not any(isinstance(m, peftkern.LoRALinear) for m in model.modules())


@pytest.mark.parametrize(
    "make_base,targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_bert, ("query", "value"))]
)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_losses_and_grads_equal_peft(make_base, targets, use_rslora):
    base = make_base()
    ref = peft_lora(base, targets, r=4, lora_alpha=8, use_rslora=use_rslora).train()
    ours = injected_like(base, ref, targets, r=4, lora_alpha=8, use_rslora=use_rslora).train()
    x = tokens()
    if make_base is tiny_llama:
        loss_ref, loss_ours = ref(input_ids=x, labels=x).loss, ours(input_ids=x, labels=x).loss
    else:
        loss_ref = ref(input_ids=x).last_hidden_state.square().mean()
        loss_ours = ours(input_ids=x).last_hidden_state.square().mean()
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=1e-6)
    loss_ref.backward()
    loss_ours.backward()
    assert_same_lora_grads(ours, ref, rtol=1e-5, atol=1e-6)
    trainable_ours = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable_ours) == sum(p.requires_grad for p in ref.parameters())


def test_dropout_statistics_match_peft():
    base = LinearHost()
    ref = peft_lora(base, ["proj"], r=4, lora_alpha=8, lora_dropout=0.3).train()
    model = injected_like(base, ref, ["proj"], r=4, lora_alpha=8, lora_dropout=0.3).train()
    assert_same_dropout_distribution(model, ref)


def test_inject_lora_keeps_float32_adapters_on_a_bfloat16_model():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.bfloat16)
    peftkern.inject_lora(model, target_modules=["0"], r=4, adapter_dtype=torch.float32)
    assert model[0].lora_A.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    out = model(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
