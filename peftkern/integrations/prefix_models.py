"""The transformers model families whose peft prefix-tuning models patch_peft runs through
peftkern's prefix attention, and what differs between them.

Every covered family calls its attention through transformers' attention interface with the
projected q, k, v (already rotated, normalised and scaled as the family does it), and peft's
KV cache does nothing but put the prefix rows in front of k and v. So the attention call is the
one place where the patched path and peft's differ, and everything a family does differently
around it runs the family's own code unchanged: fused or separate projections and their biases
(GPT-2's ``c_attn`` Conv1D), partial rotary embeddings (GPT-J), q/k norms (Gemma 3), and the
scaling each family hands the attention call (GPT-2's ``scale_attn_weights`` and
``scale_attn_by_inverse_layer_idx``, OPT's queries scaled before the call, Gemma's
``query_pre_attn_scalar``). A family entry records only what the patched path must reproduce
itself: how to find the family's attention layers, which config field holds its attention
dropout, and which positions the model derives when its cache holds the m prefix rows.

What the op cannot express is refused (`unsupported_attention`) or left to peft per call
(`sliding_window`): logit soft-capping (Gemma 2), bidirectional attention, cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def cache_positions(m: int, n: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
    """Positions ``m .. m+n-1`` for every row: what Llama-style models, GPT-2 and GPT-J derive
    from a cache of ``m`` rows, padded or not."""
    return torch.arange(m, m + n, device=device).unsqueeze(0)


def mask_positions(m: int, n: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
    """OPT's positions: the running count of kept tokens over peft's widened mask
    ``[ones(m); attention_mask]`` minus one, padding at -1, the cache's m columns cut off."""
    if attention_mask is None:
        return cache_positions(m, n, None, device)
    keep = attention_mask.to(torch.long)
    return torch.where(keep.bool(), keep.cumsum(dim=1) + (m - 1), -1)


@dataclass(frozen=True)
class PrefixFamily:
    """What differs between covered families, for the patched prefix path."""

    projection: str  # a projection every self-attention module of the family has (finds the layers)
    dropout: str  # the config field holding the attention-probability dropout
    positions: Callable[[int, int, Tensor | None, torch.device], Tensor] = cache_positions


_LLAMA_STYLE = PrefixFamily("q_proj", "attention_dropout")

# Keyed by ``config.model_type``; each is compared with unpatched peft in the tests.
FAMILIES: dict[str, PrefixFamily] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "gpt2": PrefixFamily("c_attn", "attn_pdrop"),
    "gptj": PrefixFamily("q_proj", "attn_pdrop"),
    "opt": PrefixFamily("q_proj", "attention_dropout", mask_positions),
}

_LAYER_TYPES = {"full_attention", "sliding_attention"}


def sliding_window(config: Any) -> int | None:
    """The window of the model's sliding-window layers, or None when no layer slides. A call
    whose prefix and tokens fit in it (``m + n <= window``) sees every key in every layer, so
    the window changes nothing and the call can run the prefix attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def unsupported_attention(config: Any) -> str | None:
    """Why the model's attention is something the prefix attention op does not compute (it is
    softmax(q·kᵀ·scale + padding/causal mask)·v, every query seeing every prefix row)."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return f"attention logit soft-capping (attn_logit_softcapping={softcap}): the op has none"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention=True)"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention layers (add_cross_attention=True)"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= _LAYER_TYPES:
        return f"layer types {sorted(layer_types)} (full and sliding-window attention only)"
    return None
