"""Registering an attention function with transformers, shared by the integrations that route
a model's attention through peftkern (inject_prefix, patch_peft's prefix path,
use_peftkern_attention)."""

from __future__ import annotations

from collections.abc import Callable


def register_attention(name: str, function: Callable) -> None:
    """Makes `name` an attention implementation that runs `function` (transformers' attention
    signature) with the boolean masks SDPA gets: without a mask function transformers passes
    no mask at all to an unknown implementation, and these masks carry the padding (and the
    causal triangle) that peftkern converts, or that an SDPA fallback takes as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
