"""PrefixEncoder and PrefixAttention: shapes, reparameterisation, eject, rotary, checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch.utils.checkpoint import checkpoint

import peftkern
from peftkern import reference
from peftkern.nn.prefix import rotate


@pytest.mark.parametrize("projection_hidden", [None, 24])
def test_encoder_shapes_and_eject(projection_hidden):
    torch.manual_seed(0)
    enc = peftkern.PrefixEncoder(3, 2, 8, num_virtual_tokens=5, projection_hidden=projection_hidden)
    layers = enc()
    assert len(layers) == 3
    for pk, pv in layers:
        assert pk.shape == pv.shape == (2, 5, 8)
    before = [(pk.detach().clone(), pv.detach().clone()) for pk, pv in layers]
    enc.eject()
    assert enc.projection is None and enc.embedding is None
    assert sum(p.numel() for p in enc.parameters()) == 3 * 2 * 2 * 5 * 8
    for (pk, pv), (pk0, pv0) in zip(enc(), before):
        torch.testing.assert_close(pk, pk0, rtol=0, atol=0)
        torch.testing.assert_close(pv, pv0, rtol=0, atol=0)


def test_reparameterisation_runs_once_per_call():
    enc = peftkern.PrefixEncoder(4, 2, 8, num_virtual_tokens=3, projection_hidden=16)
    calls = []
    enc.projection.register_forward_hook(lambda *args: calls.append(1))
    enc()
    assert len(calls) == 1


@pytest.mark.parametrize("projection_hidden", [None, 16])
def test_zeros_init_gives_zero_prefix_that_trains(projection_hidden):
    enc = peftkern.PrefixEncoder(
        2, 1, 4, num_virtual_tokens=3, projection_hidden=projection_hidden, init="zeros"
    )
    pk, pv = enc()[1]
    assert (pk == 0).all() and (pv == 0).all()
    (pk.sum() + pv.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        peftkern.PrefixEncoder(1, 1, 4, init="uniform")
    with pytest.raises(ValueError, match="num_kv_heads"):
        peftkern.PrefixEncoder(1, 0, 4)


def expected_block(attn, hidden, pk, pv, mask, causal):
    """The block written out with the reference attention."""
    B, n, _ = hidden.shape
    q = attn._heads(attn.q_proj(hidden), attn.num_heads)
    k = attn._heads(attn.k_proj(hidden), attn.num_kv_heads)
    v = attn._heads(attn.v_proj(hidden), attn.num_kv_heads)
    if attn.rotary:
        positions = torch.arange(pk.shape[-2], pk.shape[-2] + n)
        q, k = rotate(q, positions, attn.rope_theta), rotate(k, positions, attn.rope_theta)
    out = reference.prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask)
    return attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_block_matches_reference(rotary, num_kv_heads, causal):
    torch.manual_seed(0)
    attn = peftkern.PrefixAttention(32, 4, num_kv_heads, bias=True, rotary=rotary).double()
    enc = peftkern.PrefixEncoder(1, attn.num_kv_heads, attn.head_dim, num_virtual_tokens=3).double()
    ((pk, pv),) = enc()
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.rand(2, 7) > 0.3
    out = attn(hidden, pk, pv, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(
        out, expected_block(attn, hidden, pk, pv, mask, causal), rtol=1e-10, atol=1e-10
    )


def test_rotary_leaves_prefix_unrotated_and_offsets_positions():
    # With a zero-length prefix rotary positions start at 0; with m rows they start at m.
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, torch.arange(0, 3), 1e4)[..., 0, :], x[..., 0, :])
    assert not torch.allclose(rotate(x, torch.arange(2, 5), 1e4)[..., 0, :], x[..., 0, :])


@pytest.mark.parametrize("device", DEVICES)
def test_works_under_gradient_checkpointing(device):
    torch.manual_seed(0)
    attn = peftkern.PrefixAttention(32, 4, 2, rotary=True).to(device)
    enc = peftkern.PrefixEncoder(1, 2, 8, num_virtual_tokens=4, projection_hidden=16).to(device)
    hidden = torch.randn(2, 9, 32, device=device, requires_grad=True)

    def step(use_checkpoint):
        for p in [*attn.parameters(), *enc.parameters()]:
            p.grad = None
        hidden.grad = None
        ((pk, pv),) = enc()
        if use_checkpoint:
            out = checkpoint(attn, hidden, pk, pv, use_reentrant=False)
        else:
            out = attn(hidden, pk, pv)
        out.square().mean().backward()
        return [hidden.grad.clone(), *(p.grad.clone() for p in [*attn.parameters(), *enc.parameters()])]

    for plain, checkpointed in zip(step(False), step(True)):
        torch.testing.assert_close(plain, checkpointed)
