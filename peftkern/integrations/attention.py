"""use_peftkern_attention: a transformers model's self-attention through peftkern's CPU flash
kernel (the prefix attention with no prefix rows), wherever that kernel covers the call.

transformers models call their attention through ``ALL_ATTENTION_FUNCTIONS``; the function
registered here as ``"peftkern"`` runs peftkern's kernel for calls it covers and hands every
other call, unchanged, to transformers' own SDPA function. The attention is exact either way;
the switch only changes which kernel computes it. On the CPU, in float32, peftkern's kernel
is faster than SDPA for causal decoders (see the README's prefix benchmark) and about as fast
otherwise; GPUs keep SDPA's fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkern.integrations.hf_attention import (
    attend_with_prefix,
    restore_attention_implementation,
    switch_attention,
    transformers_model,
)

ATTENTION_NAME = "peftkern"
# The implementation this switch takes over from and falls back to.
SDPA = "sdpa"
WHO = "use_peftkern_attention"


def _not_covered(
    module: nn.Module, query: Tensor, key: Tensor, dropout: float, kwargs: dict[str, Any]
) -> bool:
    """Calls that go to SDPA: what the kernel does not do, and where SDPA is the faster one."""
    return (
        query.device.type != "cpu"  # GPUs: SDPA's fused kernels
        or query.dtype != torch.float32  # CPU half precision: SDPA's kernels take it natively
        or key.shape[2] != query.shape[2]  # a KV cache (generation) or cross-attention
        or (dropout > 0.0 and module.training)  # the kernel has no attention dropout
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None  # attention sinks
        or torch.compiler.is_compiling()  # the mask check below is a data-dependent branch
    )


def peftkern_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered as ``"peftkern"`` (transformers' signature)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _not_covered(module, query, key, dropout, kwargs):
        empty = query.new_empty(key.shape[1], 0, key.shape[3])
        try:
            return attend_with_prefix(
                module, query, key, value, attention_mask, empty, empty, scaling, kwargs, who=WHO
            )
        except ValueError:
            pass  # a mask that is not padding (+ the causal triangle): SDPA takes it as it is
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def use_peftkern_attention(model: nn.Module) -> bool:
    """Routes the self-attention of a transformers `model` (or of the model inside a peft
    model) through peftkern's flash attention wherever it covers a call: CPU, float32, no KV
    cache, padding and causal masks, no attention dropout in training, no sliding window,
    soft-capping or sinks, not under torch.compile. Every other call runs transformers' SDPA as
    before. Returns True when the model now uses it; False, leaving the model alone, when its
    attention implementation is not SDPA (eager, FlashAttention, ...: output that SDPA would
    not reproduce, or a GPU kernel to keep). `restore_attention` undoes it."""
    base = transformers_model(model, WHO)
    current = base.config._attn_implementation
    if current == ATTENTION_NAME:
        return True
    if current != SDPA:
        return False
    return switch_attention(base, ATTENTION_NAME, peftkern_attention)


def restore_attention(model: nn.Module) -> bool:
    """Switches a model back from peftkern's attention to SDPA; returns whether it had to."""
    return restore_attention_implementation(transformers_model(model, WHO), ATTENTION_NAME, SDPA)
