"""LoRALinear: a drop-in nn.Linear with an adapter, merge/unmerge, conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES
from torch import nn

import peftkern
from peftkern import reference


def trained_like(layer: peftkern.LoRALinear) -> peftkern.LoRALinear:
    """Gives B non-zero values, as after some training, so the adapter changes the output."""
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_drop_in_for_linear(device):
    base = nn.Linear(20, 12).to(device)
    layer = peftkern.LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert (layer.in_features, layer.out_features) == (20, 12)
    x = torch.randn(2, 7, 20, device=device)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init: equals the base layer
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_forward_matches_reference_with_scaling():
    layer = trained_like(peftkern.LoRALinear(16, 8, r=4, lora_alpha=12).double())
    assert layer.scaling == 3.0
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = reference.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, 3.0)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scaling():
    assert peftkern.LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_starts_at_the_base_layer(init):
    layer = peftkern.LoRALinear(32, 16, r=8, init=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.std() > 0
    if init == "gaussian":
        assert abs(layer.lora_A.std().item() - 1 / 8) < 0.03


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_merge_unmerge_round_trip(dtype, tol):
    layer = trained_like(peftkern.LoRALinear(32, 24, r=4, dtype=dtype)).eval()
    x = torch.randn(6, 32, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y_adapter = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    torch.testing.assert_close(y_merged.float(), y_adapter.float(), atol=tol * 20, rtol=tol * 20)
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.float(), w0.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(layer(x).float(), y_adapter.float(), atol=tol * 20, rtol=tol * 20)


def test_merged_layer_runs_as_plain_linear(monkeypatch):
    layer = trained_like(peftkern.LoRALinear(8, 8, r=2))
    layer.merge()
    monkeypatch.setattr(
        "peftkern.nn.lora.lora_linear", lambda *a, **k: pytest.fail("LoRA op called on a merged layer")
    )
    layer(torch.randn(3, 8))


def test_to_linear_returns_merged_copy():
    layer = trained_like(peftkern.LoRALinear(12, 10, r=3)).eval()
    w0 = layer.weight.detach().clone()
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    x = torch.randn(4, 12)
    torch.testing.assert_close(linear(x), layer(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.weight, w0) and not layer.merged  # the layer itself is unchanged


def test_dropout_only_in_training():
    layer = trained_like(peftkern.LoRALinear(16, 16, r=4, lora_dropout=0.5))
    x = torch.randn(8, 16)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert not torch.allclose(y_train, y_eval)
    torch.testing.assert_close(layer(x), y_eval)


def test_adapter_dtype_float32_on_bfloat16_base():
    layer = peftkern.LoRALinear(16, 8, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32


def test_extra_repr_and_deepcopy():
    layer = peftkern.LoRALinear(8, 4, r=2, lora_alpha=4, lora_dropout=0.1)
    text = repr(layer)
    for part in ("r=2", "lora_alpha=4", "lora_dropout=0.1", "merged=False"):
        assert part in text
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.lora_A, layer.lora_A)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r \\(the LoRA rank\\) must be a positive int"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"init": "xavier"}, "init must be"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftkern.LoRALinear(8, 8, **kwargs)


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        peftkern.LoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_state_dict_round_trip():
    layer = trained_like(peftkern.LoRALinear(8, 6, r=2))
    other = peftkern.LoRALinear(8, 6, r=2)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(other(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
