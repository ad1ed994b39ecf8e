"""Fake (meta) kernels and autograd for the torch.ops.peftkern operators.

The schemas live in csrc/ops.cpp and the device kernels in csrc/cpu and csrc/cuda. What is
registered here makes the ops traceable (torch.compile, export) and differentiable; the
backward is itself an op, so a compiled training step has no graph break.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

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
    torch._check(lora_A.shape[1] == weight.shape[1], lambda: "peftkern: lora_A.shape[1] must equal weight.shape[1]")
    torch._check(lora_B.shape[0] == weight.shape[0], lambda: "peftkern: lora_B.shape[0] must equal weight.shape[0]")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None:
            torch._check(t.device == x.device, lambda: f"peftkern: {name} is on {t.device} but x is on {x.device}")
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
    grads = lora_linear_backward_op(grad_y, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout, seed, mask)
    return (*(g if needed else None for g, needed in zip(grads, mask)), None, None, None)


torch.library.register_autograd(
    "peftkern::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
)
