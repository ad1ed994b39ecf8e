"""torch.compile(fullgraph=True) traces peftkern ops and modules forward and backward."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import peftkern


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_module_compiles_without_graph_breaks(device, dropout):
    torch._dynamo.reset()
    layer = peftkern.LoRALinear(24, 16, r=4, lora_dropout=dropout).to(device)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B]

    def step(module, inp):
        return module(inp).square().mean()

    # The dropout seed is drawn with torch.randint; fallback_random makes the compiled graph
    # draw it from torch's generator as eager does, so one manual_seed gives both the same mask.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(7)
        loss = torch.compile(step, fullgraph=True)(layer, x)
    compiled_grads = torch.autograd.grad(loss, params)
    torch.manual_seed(7)
    eager_loss = step(layer, x)
    eager_grads = torch.autograd.grad(eager_loss, params)
    torch.testing.assert_close(loss, eager_loss)
    for compiled_g, eager_g in zip(compiled_grads, eager_grads):
        assert compiled_g.abs().sum() > 0
        torch.testing.assert_close(compiled_g, eager_g)
    if dropout:  # the mask did drop something: the same step without dropout differs
        layer.eval()
        assert not torch.allclose(step(layer, x), eager_loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned_scaling", [False, True])
def test_bottleneck_adapter_module_compiles_without_graph_breaks(device, learned_scaling):
    torch._dynamo.reset()
    adapter = peftkern.BottleneckAdapter(
        24, bottleneck=4, activation="gelu", learned_scaling=learned_scaling
    ).to(device)
    torch.nn.init.normal_(adapter.w_up)
    h = torch.randn(3, 5, 24, device=device, requires_grad=True)
    residual = torch.randn(3, 5, 24, device=device, requires_grad=True)

    def step(module, inp, res):
        return module(inp, res).square().mean() + module(inp).square().mean()

    params = [h, residual, *adapter.parameters()]
    loss = torch.compile(step, fullgraph=True)(adapter, h, residual)
    compiled_grads = torch.autograd.grad(loss, params)
    eager_loss = step(adapter, h, residual)
    eager_grads = torch.autograd.grad(eager_loss, params)
    torch.testing.assert_close(loss, eager_loss)
    for compiled_g, eager_g in zip(compiled_grads, eager_grads):
        assert compiled_g.abs().sum() > 0
        torch.testing.assert_close(compiled_g, eager_g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotary", [False, True])
def test_prefix_attention_module_compiles_without_graph_breaks(device, rotary):
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = peftkern.PrefixAttention(32, 4, 2, rotary=rotary).to(device)
    enc = peftkern.PrefixEncoder(1, 2, 8, num_virtual_tokens=3, projection_hidden=16).to(device)
    hidden = torch.randn(2, 6, 32, device=device, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]], device=device)

    def step(inp):
        ((pk, pv),) = enc()
        return attn(inp, pk, pv, key_padding_mask=mask).square().mean()

    params = [hidden, *attn.parameters(), *enc.parameters()]
    loss = torch.compile(step, fullgraph=True)(hidden)
    compiled_grads = torch.autograd.grad(loss, params)
    eager_loss = step(hidden)
    eager_grads = torch.autograd.grad(eager_loss, params)
    torch.testing.assert_close(loss, eager_loss)
    for compiled_g, eager_g in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_g, eager_g)
