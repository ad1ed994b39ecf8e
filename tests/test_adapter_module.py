"""BottleneckAdapter, the Houlsby / Pfeiffer configurations and trainable-parameter counting."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch import nn

from peftkern import reference
from peftkern.nn import HOULSBY, PFEIFFER, AdapterConfig, BottleneckAdapter, count_trainable, format_trainable


@pytest.mark.parametrize("device", DEVICES)
def test_zeros_up_is_the_identity_at_init(device):
    adapter = BottleneckAdapter(40, reduction_factor=8, init="zeros_up").to(device)
    h = torch.randn(2, 7, 40, device=device)
    assert torch.equal(adapter(h), h)
    assert adapter.w_down.abs().sum() > 0


@pytest.mark.parametrize("init,std", [("bert", 0.02), ("houlsby", None)])
def test_initialisations(init, std):
    adapter = BottleneckAdapter(768, bottleneck=64, init=init)
    for w in (adapter.w_down, adapter.w_up):
        if std is not None:
            assert abs(w.std().item() - std) < 0.002
        else:  # truncated at two standard deviations of 0.01
            assert w.abs().max() <= 0.02 and 0.005 < w.std() < 0.01
    assert torch.count_nonzero(adapter.b_down) == 0 and torch.count_nonzero(adapter.b_up) == 0


def test_bottleneck_from_reduction_factor_and_shapes():
    adapter = BottleneckAdapter(768, reduction_factor=16)
    assert adapter.bottleneck == 48
    assert adapter.w_down.shape == (48, 768) and adapter.w_up.shape == (768, 48)
    assert BottleneckAdapter(768, bottleneck=7).bottleneck == 7
    assert "bottleneck=48" in repr(adapter)


@pytest.mark.parametrize("learned_scaling", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(learned_scaling, bias):
    adapter = BottleneckAdapter(
        32, bottleneck=6, activation="silu", scaling=0.5, learned_scaling=learned_scaling, bias=bias
    ).double()
    nn.init.normal_(adapter.w_up)
    if learned_scaling:
        nn.init.normal_(adapter.scaling)
    h, residual = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    args = (adapter.w_down, adapter.b_down, adapter.w_up, adapter.b_up, "silu", adapter.scaling)
    torch.testing.assert_close(adapter(h), reference.bottleneck_adapter(h, *args))
    torch.testing.assert_close(adapter(h, residual), reference.bottleneck_adapter(h, *args, residual))


def test_learned_scaling_is_trained():
    adapter = BottleneckAdapter(16, bottleneck=4, scaling=2.0, learned_scaling=True)
    assert isinstance(adapter.scaling, nn.Parameter) and torch.equal(adapter.scaling, torch.full((16,), 2.0))
    adapter(torch.randn(3, 16)).sum().backward()
    assert adapter.scaling.grad is not None and adapter.scaling.grad.abs().sum() > 0


def test_dropout_applies_to_the_branch_only():
    adapter = BottleneckAdapter(64, bottleneck=8, init="zeros_up", dropout=0.5)
    h = torch.randn(10, 64)
    assert torch.equal(adapter(h), h)  # the residual is never dropped
    nn.init.normal_(adapter.w_up)
    torch.manual_seed(0)
    train_out = adapter(h)
    adapter.eval()
    assert not torch.equal(train_out, adapter(h))
    torch.testing.assert_close(
        adapter(h),
        reference.bottleneck_adapter(h, adapter.w_down, adapter.b_down, adapter.w_up, adapter.b_up),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hidden_size": 16, "reduction_factor": 32}, "bottleneck must be a positive int"),
        ({"hidden_size": 16, "bottleneck": 0}, "bottleneck must be a positive int"),
        ({"hidden_size": 16, "init": "xavier"}, "init must be"),
        ({"hidden_size": 16, "activation": "tanh"}, "activation must be one of"),
        ({"hidden_size": 16, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAdapter(**kwargs)


def test_published_layouts():
    assert HOULSBY == AdapterConfig.houlsby() and PFEIFFER == AdapterConfig.pfeiffer()
    assert HOULSBY.positions == ("attention_output", "ffn_output") and HOULSBY.activation == "silu"
    assert PFEIFFER.positions == ("ffn_output",) and PFEIFFER.activation == "relu"


@pytest.mark.parametrize(
    "config,expected,published", [(PFEIFFER, 894_528, 0.9e6), (HOULSBY, 1_789_056, 1.8e6)]
)
def test_bert_base_parameter_counts_match_the_published_figures(config, expected, published):
    # BERT-base: 12 layers, hidden 768, reduction 16 -> bottleneck 48. Per adapter:
    # 2·768·48 weights + 48 + 768 biases = 74,544.
    adapters = config.build(hidden_size=768, num_layers=12)
    assert all(a.bottleneck == 48 for layer in adapters for a in layer.values())
    trainable, total = count_trainable(adapters)
    assert trainable == total == expected
    assert abs(trainable - published) / published < 0.01
    assert format_trainable(adapters).startswith(
        f"trainable params: {expected:,} || all params: {expected:,}"
    )


def test_count_trainable_separates_frozen_and_shared_parameters():
    base = nn.Linear(10, 10).requires_grad_(False)
    adapter = BottleneckAdapter(10, bottleneck=2)
    model = nn.ModuleDict({"base": base, "adapter": adapter, "again": base})
    assert count_trainable(model) == (2 * 10 * 2 + 2 + 10, 2 * 10 * 2 + 2 + 10 + 110)


@pytest.mark.parametrize("device", DEVICES)
def test_pfeiffer_layout_fuses_the_transformer_residual(device):
    # Pfeiffer: out = LN(x + y + A(LN(x + y))), computed as LN(adapter(LN(x + y), residual=x + y)).
    adapter = BottleneckAdapter(24, bottleneck=4).to(device)
    nn.init.normal_(adapter.w_up)
    ln = nn.LayerNorm(24).to(device)
    x, y = torch.randn(3, 24, device=device), torch.randn(3, 24, device=device)
    branch = adapter(ln(x + y)) - ln(x + y)
    torch.testing.assert_close(ln(adapter(ln(x + y), residual=x + y)), ln(x + y + branch))
