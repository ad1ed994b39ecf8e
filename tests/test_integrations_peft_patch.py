"""patch_peft: a `peft` LoRA model runs peftkern's fused op in place, same numbers, same files."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import (
    LinearHost,
    assert_same_dropout_distribution,
    assert_same_lora_grads,
    lora_factors,
    peft_lora,
    tiny_llama,
    tokens,
)
from peft import LoraConfig
from torch import nn

import peftkern
from peftkern.integrations import peft_patch

QV = ("q_proj", "v_proj")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of peftkern's fused op made by patched layers."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout"))
        return peftkern.lora_linear(*args, **kwargs)

    monkeypatch.setattr(peft_patch, "lora_linear", counting)
    return calls


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach()


def test_patched_equals_peft_and_keeps_names_and_files(tmp_path, fused_calls):
    ref = peft_lora(tiny_llama(), QV).train()
    model = copy.deepcopy(ref)
    keys_before = list(model.state_dict())
    report = peftkern.patch_peft(model)
    assert report.num_patched == 4 and report.num_skipped == 0 and "patched 4" in str(report)
    assert list(model.state_dict()) == keys_before
    x = tokens()
    torch.testing.assert_close(loss_and_grads(model, x), loss_and_grads(ref, x), rtol=1e-6, atol=1e-6)
    assert_same_lora_grads(model, ref, rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == 4
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    saved, expected = (
        load_file(tmp_path / "patched/adapter_model.safetensors"),
        load_file(tmp_path / "ref/adapter_model.safetensors"),
    )
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert peftkern.patch_peft(model).num_patched == 4  # idempotent
    assert peftkern.unpatch_peft(model) == 4
    assert all("forward" not in m.__dict__ for m in model.modules())
    fused_calls.clear()
    loss_and_grads(model, x)
    assert not fused_calls


def test_state_changes_after_patching_fall_back_to_peft(fused_calls):
    ref = peft_lora(tiny_llama(), QV)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    for action in ("merge_adapter", "unmerge_adapter"):
        getattr(model, action)()
        getattr(ref, action)()
        fused_calls.clear()
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
        assert len(fused_calls) == (0 if action == "merge_adapter" else 4)
    with model.disable_adapter(), ref.disable_adapter():
        fused_calls.clear()
        torch.testing.assert_close(model(x).logits, ref(x).logits)
        assert not fused_calls


def test_mixed_adapter_batch_falls_back_with_a_warning(fused_calls):
    ref = peft_lora(tiny_llama(), QV)
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=list(QV), init_lora_weights=False))
    ref.eval()  # peft allows adapter_names in eval mode only
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x, names = tokens(batch=2), ["default", "other"]
    with pytest.warns(UserWarning, match="adapter_names"):
        out = model(x, adapter_names=names).logits
    torch.testing.assert_close(out, ref(x, adapter_names=names).logits)
    assert not fused_calls


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"use_dora": True}, "DoraLinearVariant"),
        ({"lora_bias": True}, "lora_bias=True"),
    ],
)
def test_uncovered_layers_are_skipped_with_reason(kwargs, reason, fused_calls):
    ref = peft_lora(tiny_llama(), QV, **kwargs)
    model = copy.deepcopy(ref)
    report = peftkern.patch_peft(model)
    assert report.num_patched == 0 and report.num_skipped == 4
    assert all(reason in r for r in report.skipped.values()) and reason in str(report)
    x = tokens()
    torch.testing.assert_close(model(x).logits, ref(x).logits)
    assert not fused_calls


def test_merged_several_active_and_non_linear_layers_are_skipped():
    merged = peft_lora(tiny_llama(), QV)
    merged.merge_adapter()
    assert all("merged" in r for r in peftkern.patch_peft(merged).skipped.values())

    several = peft_lora(tiny_llama(), QV)
    several.add_adapter("other", LoraConfig(r=2, target_modules=list(QV)))
    several.base_model.set_adapter(["default", "other"])
    report = peftkern.patch_peft(several)
    assert report.num_patched == 0 and all("2 active adapters" in r for r in report.skipped.values())

    embed = peft_lora(tiny_llama(), ("embed_tokens", "q_proj"))
    report = peftkern.patch_peft(embed)
    assert report.num_patched == 2
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]


def test_base_layer_with_hooks_is_skipped():
    model = peft_lora(tiny_llama(), QV)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.base_layer.register_forward_pre_hook(lambda module, args: None)
    report = peftkern.patch_peft(model)
    assert report.num_patched == 3
    assert "forward hooks" in report.skipped["base_model.model.model.layers.0.self_attn.q_proj"]


def test_patch_peft_without_lora_layers_reports_nothing():
    assert peftkern.patch_peft(nn.Sequential(nn.Linear(2, 2))).num_patched == 0


def test_dropout_statistics_match_peft(fused_calls):
    p = 0.3
    ref = peft_lora(LinearHost(), ["proj"], r=4, lora_alpha=8, lora_dropout=p).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    assert_same_dropout_distribution(model, ref)
    assert fused_calls.count(p) == 3000  # every training-mode draw went through the fused op


def test_bfloat16_model_with_float32_adapters_is_patched(fused_calls):
    """peft keeps adapters of a bf16 model in fp32 by default; the fused op takes that mix."""
    base = tiny_llama().to(torch.bfloat16)
    ref = peft_lora(base, QV)
    assert (
        ref.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    )
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    ours, theirs = model(x).logits, ref(x).logits
    assert len(fused_calls) == 4 and ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_fused_with_autocast_dtypes(fused_calls, adapter_dtype):
    """Under autocast peft's linears run in bf16; the patched layer casts its operands the
    same way (fp32 adapters may stay fp32) and its results and grads agree to bf16 precision."""
    ref = peft_lora(tiny_llama(), QV)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    losses = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert out.logits.dtype == torch.bfloat16
    assert len(fused_calls) == 4
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
    grads, ref_grads = lora_factors(model, grads=True), lora_factors(ref, grads=True)
    for key in grads:
        assert grads[key].dtype == adapter_dtype
        scale = ref_grads[key].float().abs().max()
        assert (grads[key].float() - ref_grads[key].float()).abs().max() <= 0.05 * scale, key
