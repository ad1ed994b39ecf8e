"""DoRALinear and inject_lora(use_dora=True): against peft's own DoRA layer (outputs and every
gradient, with peft's dropout replaced by the kernels' mask), merge / unmerge / to_linear,
torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkern
from peftkern import reference
from peftkern.functional import draw_seed

peft = pytest.importorskip("peft")


class KernelMaskDropout(nn.Module):
    """Stands in for peft's nn.Dropout: the kernels' Philox mask for a given seed, so peft's
    layer and peftkern's see the same dropped x."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        return reference.dropout(rows, self.p, self.seed).reshape(x.shape)


class Tiny(nn.Module):
    def __init__(self, K, N, bias):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_and_peftkern(K=48, N=40, r=4, bias=True, dropout=0.0, train_base=False, dtype=torch.float64):
    torch.manual_seed(0)
    base = Tiny(K, N, bias).to(dtype)
    ours_base = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=r, lora_alpha=2 * r + 1, lora_dropout=dropout, target_modules=["proj"], use_dora=True
    )
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    ours = peftkern.DoRALinear.from_linear(ours_base.proj, r=r, lora_alpha=2 * r + 1, lora_dropout=dropout)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        # peft initialised its magnitude to ‖W‖ (B was 0 then); so did we.
        torch.testing.assert_close(ours.magnitude, layer.lora_magnitude_vector["default"].weight)
        for m in (ours.magnitude, layer.lora_magnitude_vector["default"].weight):
            m.mul_(torch.linspace(0.8, 1.3, N, dtype=dtype))
    if train_base:
        for p in (layer.base_layer.weight, layer.base_layer.bias, ours.weight, ours.bias):
            if p is not None:
                p.requires_grad_(True)
    return layer, ours


def grads_of(layer, params, x, grad):
    y = layer(x)
    return y, torch.autograd.grad(y, [x, *params], grad)


@pytest.mark.parametrize("dropout", [0.0, 0.15])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_base", [False, True])
def test_matches_peft_dora_layer(dropout, bias, train_base):
    layer, ours = peft_and_peftkern(bias=bias, dropout=dropout, train_base=train_base)
    theirs_params = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    ]
    our_params = [ours.lora_A, ours.lora_B, ours.magnitude]
    if train_base:
        theirs_params += [p for p in (layer.base_layer.weight, layer.base_layer.bias) if p is not None]
        our_params += [p for p in (ours.weight, ours.bias) if p is not None]
    x = torch.randn(3, 7, 48, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 7, 40, dtype=torch.float64)
    torch.manual_seed(42)
    seed = int(draw_seed(x.device))
    if dropout:
        layer.lora_dropout["default"] = KernelMaskDropout(dropout, seed)
    torch.manual_seed(42)
    y_ours, g_ours = grads_of(ours, our_params, x, grad)
    y_theirs, g_theirs = grads_of(layer, theirs_params, x, grad)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    names = ["x", "lora_A", "lora_B", "magnitude", "weight", "bias"]
    for name, a, b in zip(names, g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_matches_peft_in_float32_and_eval_mode():
    layer, ours = peft_and_peftkern(dropout=0.1, dtype=torch.float32)
    layer.eval()
    ours.eval()
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_to_linear():
    _, ours = peft_and_peftkern()
    x = torch.randn(6, 48, dtype=torch.float64)
    ours.eval()
    y = ours(x)
    linear = ours.to_linear()
    torch.testing.assert_close(linear(x), y)
    weight = ours.weight.clone()
    ours.merge()
    assert ours.merged
    torch.testing.assert_close(ours(x), y)
    torch.testing.assert_close(ours.to_linear()(x), y)
    ours.unmerge()
    torch.testing.assert_close(ours.weight, weight, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ours(x), y)


def test_merge_matches_peft_merge():
    layer, ours = peft_and_peftkern()
    layer.merge()
    ours.merge()
    torch.testing.assert_close(ours.weight, layer.base_layer.weight)


def test_magnitude_in_adapter_dtype_on_bf16_base():
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    layer = peftkern.DoRALinear.from_linear(linear, r=2, adapter_dtype=torch.float32)
    assert layer.magnitude.dtype == torch.float32
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(linear.weight.float(), dim=1))
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    layer = peftkern.DoRALinear.from_linear(nn.Linear(32, 24), r=4, lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    def step(module):
        torch.manual_seed(3)
        y = module(x)
        return (y, *torch.autograd.grad(y.square().sum(), [layer.lora_A, layer.lora_B, layer.magnitude]))

    for a, b in zip(step(layer), step(compiled)):
        torch.testing.assert_close(a, b)


def test_inject_lora_use_dora():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(4, 16)
    before = model(x)
    summary = peftkern.inject_lora(model, target_modules=["0", "2"], r=2, use_dora=True)
    assert all(isinstance(model[i], peftkern.DoRALinear) for i in (0, 2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B", "magnitude")}
    assert summary.trainable_params == sum(model.get_parameter(n).numel() for n in trainable)
    torch.testing.assert_close(model(x), before)
