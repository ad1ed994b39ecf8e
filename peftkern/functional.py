"""The functional API: one function per op, taking plain tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from peftkern.ops import (
    bottleneck_adapter_op,
    dora_linear_op,
    dora_norm_dtype,
    linear_cross_entropy_op,
    lora_linear_op,
    prefix_attention_op,
)

# The bottleneck adapter's activations, by the names the op takes ("swish" is also taken, as
# another name for "silu").
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")

_SEED_HIGH = 2**62
# The devices peftkern has kernels for, all of which have autocast. A constant rather than
# torch.amp.is_autocast_available(): dynamo before torch 2.13 cannot trace that call and would
# break the graph of every compiled LoRA layer.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed from torch's generator for `device`.

    Drawing it through torch keeps `torch.manual_seed` in control, and lets
    `torch.utils.checkpoint` (which restores the RNG state) recompute the same mask.
    """
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type`, in a form torch.compile traces."""
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Fused LoRA linear: ``x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``,
    ``bias [N]``. ``lora_A``/``lora_B`` have x's dtype, or float32 when x is float16/bfloat16
    (x is never copied to float32). Dropout applies to the LoRA branch only, and only when
    ``training``; its mask is regenerated in backward rather than stored. Under
    ``torch.autocast`` the base computation runs in the autocast dtype and float32 adapters
    stay float32.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"peftkern: dropout must be in [0, 1), got {dropout}")
    device_type = x.device.type
    if autocast_enabled(device_type):
        # Custom ops get no autocast treatment of their own. Do what autocast does for the
        # base linear (compute in the autocast dtype) while float32 adapters stay float32:
        # the op's mixed-precision mode, which never makes a float32 copy of x.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(
                x, weight, lora_A, lora_B, bias=bias, scaling=scaling, dropout=dropout, training=training
            )
    p = float(dropout) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    y, _ = lora_linear_op(x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return y


def bottleneck_adapter(
    h: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    *,
    activation: str = "relu",
    scaling: float | Tensor = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Fused bottleneck adapter: ``residual + scaling·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up)``.

    Shapes: ``h [..., d]``, ``w_down [r, d]``, ``w_up [d, r]``, ``b_down [r]``, ``b_up [d]``;
    every tensor has h's dtype. ``activation`` is "relu", "gelu" (exact), "gelu_tanh", "silu"
    (or "swish") or "identity". ``scaling`` is a float or a learned per-channel tensor ``[d]``.
    ``residual`` (h's shape) defaults to ``h``. Autograd keeps only ``h`` and the ``[rows, r]``
    pre-activation for backward.
    """
    if isinstance(scaling, Tensor):
        factor, scaling_vector = 1.0, scaling
    else:
        factor, scaling_vector = float(scaling), None
    out, _ = bottleneck_adapter_op(
        h, w_down, b_down, w_up, b_up, activation, factor, scaling_vector, residual
    )
    return out


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention over the prefix-extended keys/values, without concatenating them:
    ``softmax(q·[P_K; K]ᵀ·scale + mask)·[P_V; V]``.

    Shapes: ``q [B, Hq, n, d]``; ``k, v [B, Hkv, n, d]`` with ``Hq`` a multiple of ``Hkv``
    (grouped-query attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``);
    ``prefix_k, prefix_v [Hkv, m, d]`` shared by the batch or ``[B, Hkv, m, d]`` per example
    (``m = 0`` is plain attention). Every query sees all ``m`` prefix rows; with ``causal``
    query ``i`` sees sequence keys ``<= i``. ``key_padding_mask [B, n]`` is boolean with
    **True = keep**: False hides that sequence key from every query (prefix rows are never
    hidden). ``scale`` defaults to ``d ** -0.5``. A query that sees no key at all (``m = 0``
    and its keys all padded) gets a zero output and zero gradients, never NaN.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # head_dim 0 is refused by the op
    out, _ = prefix_attention_op(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), float(scale))
    return out


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
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` without the logits.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``labels [...]`` (int64, one
    per row of hidden; ``ignore_index`` marks rows that do not count). The logits are made
    and consumed a chunk of rows at a time, in float32 (float64 for float64 inputs), and
    ``softcap`` applies ``cap·tanh(z/cap)`` to them first (Gemma 2). ``reduction`` is "mean"
    (over counted rows; nan when none counts, as in PyTorch), "sum" or "none" (labels' shape).
    For "mean" and "sum" the gradients are computed in the forward pass and only scaled in
    backward; for "none" backward recomputes the logits. The weight's gradient is computed
    only when ``weight.requires_grad`` (a frozen head costs one GEMM less).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"peftkern: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    device_type = hidden.device.type
    if autocast_enabled(device_type):
        # What autocast does for F.linear: the logits GEMM in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    grad = torch.is_grad_enabled()
    grad_mask = [
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    ]
    loss, _, _, _ = linear_cross_entropy_op(
        hidden,
        weight,
        bias,
        labels,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        None if softcap is None else float(softcap),
        grad_mask,
    )
    return loss


def weight_norm_sq(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``‖W_n‖²`` per output row in `dtype` (detached), cached on `weight` while it is unchanged.

    The cache is keyed on the tensor's version counter (bumped by every in-place update, an
    optimizer step included), its storage and its dtype, so a changed weight is never served
    a stale norm. Under ``torch.compile`` it is computed in the graph instead.
    """
    if torch.compiler.is_compiling():
        return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=dtype).square()
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.shape, dtype)
    cached = getattr(weight, "_peftkern_norm_sq", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        value = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
    weight._peftkern_norm_sq = (key, value)
    return value


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    *,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Fused DoRA linear, peft's definition with the weight norm a constant:
    ``c = magnitude / ‖W + scaling·B·A‖`` per output row and, with ``x_d = dropout(x)``,
    ``x·Wᵀ + bias + (c − 1)⊙(x_d·Wᵀ) + c⊙scaling·(x_d·Aᵀ)·Bᵀ``, which is
    ``c⊙(x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ) + bias`` without dropout.

    Shapes and dtypes as :func:`lora_linear`, plus ``magnitude [N]`` in the adapters' dtype.
    ``‖W‖²`` per row is cached on ``weight`` per version; nothing of size ``N×K`` is formed
    per call. Autograd keeps ``x``, ``S = x_d·Aᵀ`` and one ``[rows, N]`` tensor in x's dtype.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"peftkern: dropout must be in [0, 1), got {dropout}")
    device_type = x.device.type
    if autocast_enabled(device_type):
        # As lora_linear: the base in the autocast dtype, float32 adapters and magnitude kept.
        # The norm is that of the weight as given (cached on it), not of a per-call cast copy.
        dtype = torch.get_autocast_dtype(device_type)
        norm_sq = weight_norm_sq(weight, torch.float32)  # autocast dtypes are never float64
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        if lora_A.dtype != torch.float32:
            lora_A, lora_B, magnitude = lora_A.to(dtype), lora_B.to(dtype), magnitude.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _dora_linear_call(
                x, weight, bias, lora_A, lora_B, magnitude, norm_sq, scaling, dropout, training
            )
    norm_sq = weight_norm_sq(weight, dora_norm_dtype(x))
    return _dora_linear_call(x, weight, bias, lora_A, lora_B, magnitude, norm_sq, scaling, dropout, training)


def _dora_linear_call(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm_sq: Tensor,
    scaling: float,
    dropout: float,
    training: bool,
) -> Tensor:
    p = float(dropout) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    y, _, _, _ = dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, norm_sq, float(scaling), p, seed)
    return y
