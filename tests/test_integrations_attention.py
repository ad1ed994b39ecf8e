"""use_peftkern_attention: a model's self-attention through peftkern's flash kernel where it
covers a call, transformers' SDPA everywhere else; the same outputs and gradients as SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import peft_lora, tiny_bert, tiny_llama, tokens

import peftkern
from peftkern.integrations import attention


def _output(model, x, mask=None, **kwargs):
    out = model(x, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _padded(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[1, -4:] = 0
    return mask


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach peftkern's kernel (the rest went to SDPA)."""
    calls = []
    original = attention.attend_with_prefix

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)  # a mask it refuses raises before this counts
        calls.append(args[1].shape)
        return result

    monkeypatch.setattr(attention, "attend_with_prefix", counting)
    return calls


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("padded", [False, True])
def test_same_outputs_and_gradients_as_sdpa(build, padded, kernel_calls):
    reference = build().train()
    model = copy.deepcopy(reference)
    assert peftkern.use_peftkern_attention(model)
    assert model.config._attn_implementation == "peftkern"
    x = tokens()
    mask = _padded(x) if padded else None
    out, ref = _output(model, x, mask), _output(reference, x, mask)
    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer ran the kernel
    keep = (mask if mask is not None else torch.ones_like(x)).bool()  # padded positions: any value
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    # A random weighting: BERT's outputs are layer-normed, so their sum of squares is nearly
    # constant and its gradients would be rounding noise.
    weights = torch.randn(ref[keep].shape, generator=torch.Generator().manual_seed(5))
    (out[keep] * weights).sum().backward()
    (ref[keep] * weights).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_patched_peft_lora_model_trains_the_same(kernel_calls):
    peft_model = peft_lora(tiny_llama(), ["q_proj", "v_proj"])
    reference = copy.deepcopy(peft_model)
    peftkern.patch_peft(peft_model)
    assert peftkern.use_peftkern_attention(peft_model)  # the model inside the peft model
    x = tokens()
    out, ref = _output(peft_model, x), _output(reference, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert kernel_calls


def test_uncovered_calls_go_to_sdpa_unchanged(kernel_calls):
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    peftkern.use_peftkern_attention(model)
    prompt = tokens(batch=1, seq=5)
    with torch.no_grad():
        # Generation with a KV cache: after the prompt, one query against the cached keys.
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)
    assert len(kernel_calls) == model.config.num_hidden_layers  # the prompt only
    kernel_calls.clear()
    x = tokens()
    with torch.no_grad():  # a mask that is not padding: a query hidden from an earlier key
        custom = torch.ones(2, 1, x.shape[1], x.shape[1], dtype=torch.bool).tril()
        custom[0, 0, 5, 2] = False
        torch.testing.assert_close(_output(model, x, custom), _output(reference, x, custom))
    assert not kernel_calls
    with torch.no_grad():  # half precision on the CPU: SDPA's own kernels
        half_ref = copy.deepcopy(reference).to(torch.bfloat16)
        half = copy.deepcopy(model).to(torch.bfloat16)
        torch.testing.assert_close(_output(half, x), _output(half_ref, x))
    assert not kernel_calls


def test_switching_back_and_models_it_leaves_alone():
    model = tiny_llama()
    assert peftkern.use_peftkern_attention(model) and peftkern.use_peftkern_attention(model)
    assert peftkern.restore_attention(model) and model.config._attn_implementation == "sdpa"
    assert not peftkern.restore_attention(model)
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not peftkern.use_peftkern_attention(eager)  # eager gives attention weights; kept
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="needs a transformers PreTrainedModel"):
        peftkern.use_peftkern_attention(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_recomputes_through_the_kernel(kernel_calls):
    reference = tiny_llama().train()
    model = copy.deepcopy(reference)
    peftkern.use_peftkern_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = tokens()
    model(x, labels=x).loss.backward()
    reference(x, labels=x).loss.backward()
    layers = model.config.num_hidden_layers
    assert len(kernel_calls) == 2 * layers  # the forward, and the recomputation in backward
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
