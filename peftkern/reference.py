"""Plain-PyTorch versions of every peftkern op: the truth the tests compare against.

They are written for clarity, not speed, and use the same counter-based dropout mask as
the kernels (Philox4x32-10 keyed by the seed, counter = (column // 4, row)), so results can
be compared element by element even with dropout on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a and uint32 values b in int64 tensors.

    The product is split in 16-bit halves of `a` so no intermediate exceeds 2^49.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    low = a_lo * b
    high = a_hi * b
    lo_sum = low + ((high & 0xFFFF) << 16)
    lo = lo_sum & _MASK32
    hi = ((high >> 16) + (lo_sum >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, seed: int) -> list[Tensor]:
    """The four 32-bit Philox words for counters (c0, c1, c2, 0) and a 64-bit key."""
    ctr = [c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, torch.zeros_like(c0)]
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, ctr[0])
        hi1, lo1 = _mulhilo32(_PHILOX_M1, ctr[2])
        ctr = [hi1 ^ ctr[1] ^ k0, lo1, hi0 ^ ctr[3] ^ k1, lo0]
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return ctr


def dropout_keep(rows: int, cols: int, seed: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean keep-mask [rows, cols] of the kernels' dropout for this seed and probability."""
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None].expand(rows, cols)
    col = torch.arange(cols, dtype=torch.int64, device=device)[None, :].expand(rows, cols)
    words = philox4x32_10(col // 4, row, row >> 32, seed % 2**64)
    lane = col % 4
    word = torch.where(
        lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3]))
    )
    threshold = math.ceil(p * 2**24)
    return (word >> 8) >= threshold


def dropout(x2d: Tensor, p: float, seed: int) -> Tensor:
    """The kernels' dropout of a [rows, cols] tensor: kept elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return x2d
    keep = dropout_keep(x2d.shape[0], x2d.shape[1], seed, p, x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """y = x·Wᵀ + bias + scaling·(drop(x)·Aᵀ)·Bᵀ, the LoRA branch in the adapter's dtype."""
    K = x.shape[-1]
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not -1: ambiguous when K = 0
    dropped = dropout(x2d.to(lora_A.dtype), dropout_p, seed)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B) * scaling
    y = torch.nn.functional.linear(x2d, weight, bias) + lora.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def adapter_activation(z: Tensor, activation: str) -> Tensor:
    """The bottleneck adapter's activation by name (``swish`` is ``silu``)."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation in ("silu", "swish"):
        return torch.nn.functional.silu(z)
    if activation == "identity":
        return z
    raise ValueError(f"peftkern: unknown activation {activation!r}")


def bottleneck_adapter(
    h: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str = "relu",
    scaling: float | Tensor = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """out = residual + scaling·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up), residual = h by default.

    ``scaling`` is a float or a per-channel tensor ``[d]``.
    """
    z = torch.nn.functional.linear(h, w_down, b_down)
    up = torch.nn.functional.linear(adapter_activation(z, activation), w_up, b_up)
    return (h if residual is None else residual) + up * scaling


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The obvious way: concatenate [P_K; K] and [P_V; V], build the explicit boolean mask
    [B, 1, n, m + n] (True = attend) and call scaled_dot_product_attention. A query that sees
    no key at all gets a zero output (the kernels' documented behaviour)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    m = prefix_k.shape[-2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    k_ext = torch.cat([prefix_k, k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    v_ext = torch.cat([prefix_v, v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    keep = torch.ones(B, 1, n, n, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    keep = torch.cat([torch.ones(B, 1, n, m, dtype=torch.bool, device=q.device), keep], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k_ext, v_ext, attn_mask=keep, scale=scale)
    return torch.where(keep.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """The eager expression: the full logits, in float32 (float64 for float64 inputs), then
    F.cross_entropy; ``reduction="none"`` returns labels' shape."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, -2),
        labels.flatten(),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """peft's DoRA written out: ``n = ‖W + s·B·A‖`` per row from the explicit N×K sum
    (detached), ``c = magnitude / n`` and ``x·Wᵀ + bias + (c − 1)⊙(x_d·Wᵀ) + c⊙s·(x_d·Aᵀ)·Bᵀ``."""
    K = x.shape[-1]
    x2d = x.reshape(math.prod(x.shape[:-1]), K)
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        combined = weight.to(norm_dtype) + scaling * (lora_B.to(norm_dtype) @ lora_A.to(norm_dtype))
        norm = torch.linalg.vector_norm(combined, dim=1)
    c = magnitude.to(norm_dtype) / norm
    dropped = dropout(x2d.to(lora_A.dtype), dropout_p, seed)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B) * scaling
    base_dropped = torch.nn.functional.linear(dropout(x2d, dropout_p, seed), weight)
    y = torch.nn.functional.linear(x2d, weight, bias) + (c - 1) * base_dropped + c * lora
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
