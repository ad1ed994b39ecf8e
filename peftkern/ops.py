"""Fake (meta) kernels and autograd for the torch.ops.peftkern operators.

The schemas live in csrc/ops.cpp and the device kernels in csrc/cpu and csrc/cuda. What is
registered here makes the ops traceable (torch.compile, export) and differentiable; the
backward is itself an op, so a compiled training step has no graph break.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

lora_linear_op = torch.ops.peftkern.lora_linear.default
lora_linear_backward_op = torch.ops.peftkern.lora_linear_backward.default


def _grad_or_empty(needed: bool, like: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return like.new_empty(tuple(shape) if needed else (0,), dtype=dtype)


@torch.library.register_fake("peftkern::lora_linear")
def _lora_linear_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    # The C++ kernels check everything; the fake repeats what decides output shapes and
    # placement, so a traced program fails at trace time with the same words.
    torch._check(x.shape[-1] == weight.shape[1], lambda: "peftkern: x.shape[-1] must equal weight.shape[1]")
    torch._check(
        lora_A.shape[1] == weight.shape[1], lambda: "peftkern: lora_A.shape[1] must equal weight.shape[1]"
    )
    torch._check(
        lora_B.shape[0] == weight.shape[0], lambda: "peftkern: lora_B.shape[0] must equal weight.shape[0]"
    )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None:
            torch._check(
                t.device == x.device, lambda: f"peftkern: {name} is on {t.device} but x is on {x.device}"
            )
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    S = lora_A.new_empty((rows, lora_A.shape[0]))
    return y, S


@torch.library.register_fake("peftkern::lora_linear_backward")
def _lora_linear_backward_fake(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    S: Tensor,
    scaling: float,
    dropout: float,
    seed: Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_dx, need_dW, need_dbias, need_dA, need_dB = output_mask
    return (
        _grad_or_empty(need_dx, x, x.shape, x.dtype),
        _grad_or_empty(need_dW, weight, weight.shape, weight.dtype),
        _grad_or_empty(need_dbias, weight, (weight.shape[0],), weight.dtype),
        _grad_or_empty(need_dA, lora_A, lora_A.shape, lora_A.dtype),
        _grad_or_empty(need_dB, lora_B, lora_B.shape, lora_B.dtype),
    )


def _lora_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout, seed = inputs
    _, S = output
    # x, S and the seed are the only activations kept: the dropout mask is regenerated from
    # the seed in backward. weight, lora_A and lora_B are parameters (no extra memory).
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
    ctx.scaling = scaling
    ctx.dropout = dropout
    ctx.mark_non_differentiable(S)


def _lora_linear_backward(ctx: Any, grad_y: Tensor, grad_S: Tensor | None) -> tuple[Tensor | None, ...]:
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    # Inputs are (x, weight, bias, lora_A, lora_B, ...), the order the backward op returns.
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = lora_linear_backward_op(
        grad_y, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout, seed, mask
    )
    return (*(g if needed else None for g, needed in zip(grads, mask)), None, None, None)


torch.library.register_autograd(
    "peftkern::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
)


bottleneck_adapter_op = torch.ops.peftkern.bottleneck_adapter.default
bottleneck_adapter_backward_op = torch.ops.peftkern.bottleneck_adapter_backward.default


@torch.library.register_fake("peftkern::bottleneck_adapter")
def _bottleneck_adapter_fake(
    h: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str,
    scaling: float,
    scaling_vector: Tensor | None,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor]:
    torch._check(h.shape[-1] == w_down.shape[1], lambda: "peftkern: h.shape[-1] must equal w_down.shape[1]")
    torch._check(
        w_up.shape[0] == w_down.shape[1], lambda: "peftkern: w_up.shape[0] must equal w_down.shape[1]"
    )
    torch._check(
        w_up.shape[1] == w_down.shape[0], lambda: "peftkern: w_up.shape[1] must equal w_down.shape[0]"
    )
    rows = math.prod(h.shape[:-1])
    return h.new_empty(h.shape), h.new_empty((rows, w_down.shape[0]))


@torch.library.register_fake("peftkern::bottleneck_adapter_backward")
def _bottleneck_adapter_backward_fake(
    grad_out: Tensor,
    h: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor | None,
    pre_activation: Tensor,
    activation: str,
    scaling: float,
    scaling_vector: Tensor | None,
    residual_is_h: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_dh, need_dwd, need_dbd, need_dwu, need_dbu, need_ds = output_mask
    r, d = w_down.shape
    return (
        _grad_or_empty(need_dh, h, h.shape, h.dtype),
        _grad_or_empty(need_dwd, w_down, w_down.shape, w_down.dtype),
        _grad_or_empty(need_dbd, w_down, (r,), w_down.dtype),
        _grad_or_empty(need_dwu, w_up, w_up.shape, w_up.dtype),
        _grad_or_empty(need_dbu, w_up, (d,), w_up.dtype),
        _grad_or_empty(need_ds, w_up, (d,), w_up.dtype),
    )


def _bottleneck_adapter_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
) -> None:
    h, w_down, b_down, w_up, b_up, activation, scaling, scaling_vector, residual = inputs
    _, Z = output
    # h and the [rows, r] pre-activation are the only activations kept; the rest are
    # parameters. The residual is not needed: its gradient is grad_out itself.
    ctx.save_for_backward(h, w_down, w_up, b_up, Z, scaling_vector)
    ctx.activation = activation
    ctx.scaling = scaling
    ctx.residual_is_h = residual is None
    ctx.mark_non_differentiable(Z)


def _bottleneck_adapter_backward(
    ctx: Any, grad_out: Tensor, grad_Z: Tensor | None
) -> tuple[Tensor | None, ...]:
    h, w_down, w_up, b_up, Z, scaling_vector = ctx.saved_tensors
    # Inputs are (h, w_down, b_down, w_up, b_up, activation, scaling, scaling_vector, residual).
    needs = ctx.needs_input_grad
    mask = [bool(needs[i]) for i in (0, 1, 2, 3, 4, 7)]
    dh, dwd, dbd, dwu, dbu, ds = bottleneck_adapter_backward_op(
        grad_out,
        h,
        w_down,
        w_up,
        b_up,
        Z,
        ctx.activation,
        ctx.scaling,
        scaling_vector,
        ctx.residual_is_h,
        mask,
    )
    grads = [g if needed else None for g, needed in zip((dh, dwd, dbd, dwu, dbu, ds), mask)]
    d_residual = grad_out if needs[8] else None
    return (*grads[:5], None, None, grads[5], d_residual)


torch.library.register_autograd(
    "peftkern::bottleneck_adapter",
    _bottleneck_adapter_backward,
    setup_context=_bottleneck_adapter_setup_context,
)


# --- prefix attention ------------------------------------------------------------------------

prefix_attention_op = torch.ops.peftkern.prefix_attention.default
prefix_attention_backward_op = torch.ops.peftkern.prefix_attention_backward.default


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _heads_layout(like: Tensor) -> Tensor:
    """An empty [B, H, n, d] tensor over [B, n, H, d] memory: the layout attention layers get
    from their projections and hand back to them, so out and the gradients cost no copy there.
    Fixed whatever the input strides, since compilers plan buffers from it."""
    B, H, n, d = like.shape
    return like.new_empty((B, n, H, d)).transpose(1, 2)


@torch.library.register_fake("peftkern::prefix_attention")
def _prefix_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    torch._check(
        q.dim() == 4 and k.dim() == 4, lambda: "peftkern: q and k must be 4-D [batch, heads, seq, head_dim]"
    )
    torch._check(
        q.shape[1] % k.shape[1] == 0, lambda: "peftkern: q.shape[1] must be a multiple of k.shape[1]"
    )
    torch._check(k.shape[3] == q.shape[3], lambda: "peftkern: k.shape[3] must equal q.shape[3] (head_dim)")
    torch._check(
        prefix_k.shape[-1] == q.shape[3],
        lambda: "peftkern: prefix_k.shape[-1] must equal q.shape[3] (head_dim)",
    )
    return _heads_layout(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.register_fake("peftkern::prefix_attention_backward")
def _prefix_attention_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # dq, dk, dv in the heads layout like out; the prefix gradients are contiguous.
    q_grads = tuple(
        _heads_layout(t) if needed else t.new_empty((0,)) for needed, t in zip(output_mask, (q, k, v))
    )
    prefix_grads = tuple(
        _grad_or_empty(needed, t, t.shape, t.dtype)
        for needed, t in zip(output_mask[3:], (prefix_k, prefix_v))
    )
    return q_grads + prefix_grads


def _prefix_attention_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale = inputs
    out, lse = output
    # The inputs, the output and the log-sum-exp are all that is kept: backward recomputes
    # the probabilities block by block from lse, so no n²-sized tensor outlives forward.
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _prefix_attention_backward(
    ctx: Any, grad_out: Tensor, grad_lse: Tensor | None
) -> tuple[Tensor | None, ...]:
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = prefix_attention_backward_op(
        grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, ctx.causal, ctx.scale, mask
    )
    return (*(g if needed else None for g, needed in zip(grads, mask)), None, None, None)


torch.library.register_autograd(
    "peftkern::prefix_attention", _prefix_attention_backward, setup_context=_prefix_attention_setup_context
)


def _refuse_second_derivative(forward_name: str) -> None:
    """Gives peftkern::<forward_name>_backward an autograd formula that refuses to run.

    The backward kernels are not differentiable. Without a formula of their own, a backward
    taken with create_graph=True would run them with autograd still active inside, where the
    ATen calls either fail with an unrelated message or record a partial graph that yields a
    wrong second derivative. With this formula the first derivative works as usual, its
    result is marked, and differentiating it again raises an error that says why."""

    def backward(ctx: Any, *grads: Tensor) -> None:
        raise RuntimeError(
            f"peftkern: {forward_name} is differentiable once; differentiating its gradient "
            "again (double backward after create_graph=True) is not supported"
        )

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    torch.library.register_autograd(
        f"peftkern::{forward_name}_backward", backward, setup_context=setup_context
    )


for _name in ("lora_linear", "bottleneck_adapter", "prefix_attention"):
    _refuse_second_derivative(_name)


# --- linear + cross-entropy ------------------------------------------------------------------

linear_cross_entropy_op = torch.ops.peftkern.linear_cross_entropy.default
linear_cross_entropy_backward_op = torch.ops.peftkern.linear_cross_entropy_backward.default


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _linear_cross_entropy_grads_fake(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, mask: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        _grad_or_empty(mask[0], hidden, hidden.shape, hidden.dtype),
        _grad_or_empty(mask[1], weight, weight.shape, weight.dtype),
        _grad_or_empty(mask[2] and bias is not None, weight, (weight.shape[0],), weight.dtype),
    )


@torch.library.register_fake("peftkern::linear_cross_entropy")
def _linear_cross_entropy_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    grad_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(
        hidden.shape[-1] == weight.shape[1], lambda: "peftkern: hidden.shape[-1] must equal weight.shape[1]"
    )
    torch._check(
        labels.numel() == math.prod(hidden.shape[:-1]),
        lambda: "peftkern: labels must have one entry per row of hidden",
    )
    torch._check(
        reduction in ("mean", "sum", "none"),
        lambda: f"peftkern: reduction must be 'mean', 'sum' or 'none', got {reduction!r}",
    )
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=_loss_dtype(hidden))
    mask = [bool(m) and reduction != "none" for m in grad_mask]
    return (loss, *_linear_cross_entropy_grads_fake(hidden, weight, bias, mask))


@torch.library.register_fake("peftkern::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_cross_entropy_grads_fake(hidden, weight, bias, output_mask)


def _linear_cross_entropy_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor, Tensor]
) -> None:
    hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, softcap, grad_mask = inputs
    _, dh, dW, db = output
    wanted = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    # Gradients made in forward (a scalar loss) only need scaling: nothing else is kept, not
    # even hidden. Otherwise (reduction "none", or a gradient forward was not asked for)
    # backward recomputes the logits chunk by chunk from the inputs.
    ctx.precomputed = reduction != "none" and all(m or not w for m, w in zip(grad_mask, wanted))
    if ctx.precomputed:
        ctx.save_for_backward(dh, dW, db)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels)
    ctx.args = (ignore_index, reduction, label_smoothing, softcap)
    ctx.mark_non_differentiable(dh, dW, db)


def _linear_cross_entropy_backward(
    ctx: Any, grad_loss: Tensor, *unused_grads: Tensor | None
) -> tuple[Tensor | None, ...]:
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    if ctx.precomputed:
        if torch.is_grad_enabled():
            # create_graph=True: the precomputed gradients carry no graph of their own, so a
            # second derivative through them would be silently wrong.
            raise RuntimeError(
                "peftkern: linear_cross_entropy is differentiable once; differentiating its "
                "gradient again (double backward after create_graph=True) is not supported"
            )
        grads = [g * grad_loss if needed else None for g, needed in zip(ctx.saved_tensors, mask)]
    else:
        hidden, weight, bias, labels = ctx.saved_tensors
        computed = linear_cross_entropy_backward_op(grad_loss, hidden, weight, bias, labels, *ctx.args, mask)
        grads = [g if needed else None for g, needed in zip(computed, mask)]
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd(
    "peftkern::linear_cross_entropy",
    _linear_cross_entropy_backward,
    setup_context=_linear_cross_entropy_setup_context,
)
_refuse_second_derivative("linear_cross_entropy")

# --- DoRA linear -----------------------------------------------------------------------------

dora_linear_op = torch.ops.peftkern.dora_linear.default
dora_linear_backward_op = torch.ops.peftkern.dora_linear_backward.default


def dora_norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype DoRA's weight norm is computed and passed in: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("peftkern::dora_linear")
def _dora_linear_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm_sq: Tensor,
    scaling: float,
    dropout: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, S = _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)
    N = weight.shape[0]
    torch._check(
        magnitude.dim() == 1 and magnitude.shape[0] == N,
        lambda: "peftkern: magnitude must be 1-D [out_features] of length weight.shape[0]",
    )
    torch._check(magnitude.dtype == lora_A.dtype, lambda: "peftkern: magnitude must have the dtype of lora_A")
    z = x.new_empty((S.shape[0], N))
    return y, S, z, x.new_empty((N,), dtype=dora_norm_dtype(x))


@torch.library.register_fake("peftkern::dora_linear_backward")
def _dora_linear_backward_fake(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    S: Tensor,
    z: Tensor,
    weight_norm: Tensor,
    scaling: float,
    dropout: float,
    seed: Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    lora_grads = _lora_linear_backward_fake(
        grad_y, x, weight, lora_A, lora_B, S, scaling, dropout, seed, output_mask[:5]
    )
    return (*lora_grads, _grad_or_empty(output_mask[5], magnitude, magnitude.shape, magnitude.dtype))


def _dora_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout, seed = inputs
    _, S, z, weight_norm = output
    # Activations kept: x, S ([rows, r]), z ([rows, out_features] in x's dtype, what the
    # magnitude's gradient needs), the norm ([out_features]) and the seed; the dropout mask is
    # regenerated from the seed. weight, lora_A, lora_B and magnitude are parameters.
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, S, z, weight_norm, seed)
    ctx.scaling = scaling
    ctx.dropout = dropout
    ctx.mark_non_differentiable(S, z, weight_norm)


def _dora_linear_backward(ctx: Any, grad_y: Tensor, *unused: Tensor | None) -> tuple[Tensor | None, ...]:
    x, weight, lora_A, lora_B, magnitude, S, z, weight_norm, seed = ctx.saved_tensors
    # Inputs are (x, weight, bias, lora_A, lora_B, magnitude, ...), the order the backward op returns.
    mask = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = dora_linear_backward_op(
        grad_y, x, weight, lora_A, lora_B, magnitude, S, z, weight_norm, ctx.scaling, ctx.dropout, seed, mask
    )
    return (*(g if needed else None for g, needed in zip(grads, mask)), None, None, None, None)


torch.library.register_autograd(
    "peftkern::dora_linear", _dora_linear_backward, setup_context=_dora_linear_setup_context
)
_refuse_second_derivative("dora_linear")
