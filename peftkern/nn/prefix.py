"""Prefix tuning: PrefixEncoder (the trainable prefix rows of every layer) and PrefixAttention
(a self-attention block that attends over its layer's prefix without concatenating it)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from peftkern.functional import prefix_attention

PrefixInit = Literal["normal", "zeros"]


class PrefixEncoder(nn.Module):
    """The ``m = num_virtual_tokens`` key/value prefix rows of every layer.

    ``forward()`` returns one ``(P_K, P_V)`` pair per layer, each ``[num_kv_heads, m, head_dim]``
    and shared by the whole batch. Without ``projection_hidden`` the rows are parameters
    themselves. With it they are produced by the reparameterisation of the prefix-tuning paper,
    ``embedding → Linear(·, projection_hidden) → tanh → Linear(·, layers·2·kv_heads·head_dim)``,
    run once per forward call for all layers (never per example). ``eject()`` replaces the MLP
    by the prefix it produces, for inference. ``init="zeros"`` starts from an all-zero prefix
    (the last projection is zeroed when there is one).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int = 20,
        projection_hidden: int | None = None,
        init: PrefixInit = "normal",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if init not in ("normal", "zeros"):
            raise ValueError(f"peftkern: init must be 'normal' or 'zeros', got {init!r}")
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if value <= 0:
                raise ValueError(f"peftkern: {name} must be > 0, got {value}")
        if num_virtual_tokens < 0:
            raise ValueError(f"peftkern: num_virtual_tokens must be >= 0, got {num_virtual_tokens}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.projection_hidden = projection_hidden
        factory = {"device": device, "dtype": dtype}
        width = num_kv_heads * head_dim
        if projection_hidden is None:
            self.prefix = nn.Parameter(
                torch.empty(num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim, **factory)
            )
            self.embedding = self.projection = None
            if init == "normal":
                nn.init.normal_(self.prefix)
            else:
                nn.init.zeros_(self.prefix)
        else:
            self.prefix = None
            self.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
            self.projection = nn.Sequential(
                nn.Linear(width, projection_hidden, **factory),
                nn.Tanh(),
                nn.Linear(projection_hidden, num_layers * 2 * width, **factory),
            )
            if init == "zeros":
                nn.init.zeros_(self.projection[2].weight)
                nn.init.zeros_(self.projection[2].bias)

    def _all_layers(self) -> Tensor:
        """[num_layers, 2, num_kv_heads, m, head_dim]."""
        if self.prefix is not None:
            return self.prefix
        rows = self.projection(self.embedding.weight)  # [m, layers·2·Hkv·d], once per call
        m = self.num_virtual_tokens
        return rows.view(m, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def forward(self) -> list[tuple[Tensor, Tensor]]:
        prefix = self._all_layers()
        return [(prefix[layer, 0], prefix[layer, 1]) for layer in range(self.num_layers)]

    @torch.no_grad()
    def eject(self) -> PrefixEncoder:
        """Replaces the reparameterisation MLP by the prefix it produces (same outputs, no MLP
        at inference). A no-op without a projection. Returns self."""
        if self.prefix is None:
            self.prefix = nn.Parameter(self._all_layers().contiguous())
            self.embedding = self.projection = None
            self.projection_hidden = None
        return self

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_virtual_tokens={self.num_virtual_tokens}, projection_hidden={self.projection_hidden}"
        )


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (rotate-half convention) of x [B, H, n, d] at positions [n]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class PrefixAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with q/k/v/o projections that attends over
    its layer's prefix as well as the sequence: ``forward(hidden [B, n, hidden_size], prefix_k,
    prefix_v, key_padding_mask=None, causal=True)``, prefix as returned by PrefixEncoder
    (``[num_kv_heads, m, head_dim]``, or ``[B, num_kv_heads, m, head_dim]`` per example).

    With ``rotary=True`` queries and keys are rotated at token positions ``m, m+1, …``
    (the prefix occupies positions ``0..m-1``) and the prefix rows are left unrotated, as in
    the common prefix-tuning setup. ``key_padding_mask [B, n]`` is boolean, True = keep.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = False,
        rotary: bool = False,
        rope_theta: float = 10000.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"peftkern: hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"peftkern: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        if rotary and self.head_dim % 2 != 0:
            raise ValueError(f"peftkern: rotary needs an even head_dim, got {self.head_dim}")
        self.rotary, self.rope_theta = rotary, rope_theta
        factory = {"device": device, "dtype": dtype}
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, kv_width, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, kv_width, bias=bias, **factory)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        B, n, _ = x.shape
        return x.view(B, n, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden: Tensor,
        prefix_k: Tensor,
        prefix_v: Tensor,
        key_padding_mask: Tensor | None = None,
        causal: bool = True,
    ) -> Tensor:
        B, n, _ = hidden.shape
        q = self._heads(self.q_proj(hidden), self.num_heads)
        k = self._heads(self.k_proj(hidden), self.num_kv_heads)
        v = self._heads(self.v_proj(hidden), self.num_kv_heads)
        if self.rotary:
            m = prefix_k.shape[-2]
            positions = torch.arange(m, m + n, device=hidden.device)
            q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        out = prefix_attention(
            q,
            k,
            v,
            prefix_k.to(q.dtype),
            prefix_v.to(q.dtype),
            causal=causal,
            key_padding_mask=key_padding_mask,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, n, self.hidden_size))

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"rotary={self.rotary}"
        )
