"""The transformers attention plumbing shared by every integration that routes a model's
attention through peftkern (inject_prefix, patch_peft's prefix path, use_peftkern_attention):
the model behind a peft wrapper, its attention layers, switching its attention implementation
(register, set, check, revert), and one layer's attention call over prefix rows with
transformers' mask converted to peftkern's key padding mask."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from peftkern.functional import prefix_attention


def transformers_model(model: nn.Module, who: str) -> nn.Module:
    """The transformers model itself, for a plain one or a peft model wrapping it; anything
    else is a ValueError naming the caller (`who`)."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if getattr(base, "config", None) is None or not hasattr(base, "set_attn_implementation"):
        raise ValueError(
            f"peftkern: {who} needs a transformers PreTrainedModel (or a peft model of one), got {type(base).__name__}"
        )
    return base


def attention_layers(
    model: nn.Module, num_layers: int, projections: tuple[str, ...] = ("q_proj", "query")
) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a transformers model, one per layer ``0..num_layers-1``:
    the modules with an int ``layer_idx`` and one of the `projections` (by default ``q_proj``,
    Llama naming, or ``query``, BERT naming; GPT-2 has ``c_attn``). A ValueError when there is
    not exactly one per layer."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and any(isinstance(getattr(m, p, None), nn.Module) for p in projections)
    ]
    indices = sorted(m.layer_idx for _, m in found)
    if indices != list(range(num_layers)):
        raise ValueError(
            f"{type(model).__name__} should have one self-attention module (with a {' or '.join(projections)} "
            f"projection and a layer_idx) per layer, 0..{num_layers - 1}; found layer indices {indices}"
        )
    return found


def register_attention(name: str, function: Callable) -> None:
    """Makes `name` an attention implementation that runs `function` (transformers' attention
    signature) with the boolean masks SDPA gets: without a mask function transformers passes
    no mask at all to an unknown implementation, and these masks carry the padding (and the
    causal triangle) that peftkern converts, or that an SDPA fallback takes as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def switch_attention(model: nn.Module, name: str, function: Callable) -> bool:
    """Registers `function` as attention implementation `name` and switches the transformers
    `model` to it. Returns False, with the model's implementation as it was, when the model
    does not take it (a model without transformers' attention interface)."""
    previous = model.config._attn_implementation
    register_attention(name, function)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(previous)
        return False
    return True


def restore_attention_implementation(model: nn.Module, name: str, original: str) -> bool:
    """Switches the transformers `model` from implementation `name` back to `original`;
    returns whether it had to (False when the model runs something else by now)."""
    if model.config._attn_implementation != name:
        return False
    model.set_attn_implementation(original)
    return True


def padding_mask(attention_mask: Tensor | None, causal: bool, n: int, who: str) -> Tensor | None:
    """transformers' 4-D mask [B, 1|H, n, n] (bool True = attend, or additive float) as
    peftkern's key padding mask [B, n] (True = keep). Only padding (plus the causal triangle
    when `causal`) can be expressed that way; any other pattern is refused rather than
    silently dropped. Rows of padded queries are not checked: their outputs are never used,
    and transformers may unmask them to avoid NaN."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (n, n):
        raise ValueError(
            f"peftkern: {who}: attention mask of shape {tuple(attention_mask.shape)}, expected [B, 1, {n}, {n}]"
        )
    allowed = (
        attention_mask
        if attention_mask.dtype == torch.bool
        else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    )
    keep = allowed.any(dim=1).any(dim=1)  # a key is padding when no query may attend to it
    expected = keep[:, None, None, :]
    if causal:
        expected = expected & torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
    mismatch = ((allowed != expected) & keep[:, None, :, None]).any()
    message = (
        f"peftkern: {who}: the attention mask is not a padding mask"
        + (" plus the causal triangle" if causal else "")
        + " (packed sequences, sliding windows or custom masks are not supported)"
    )
    if torch.compiler.is_compiling():
        # A Python branch on a tensor value breaks torch.compile's graph, in every layer, and
        # traced transformers passes the 4-D mask for any attention_mask, padded or not. So the
        # check runs inside the graph (a RuntimeError on CPU, a device-side assert on CUDA) and
        # an all-True mask is kept rather than dropped.
        torch._assert_async(~mismatch, message)
        return keep
    if mismatch:
        raise ValueError(message)
    return None if bool(keep.all()) else keep


def attend_with_prefix(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    prefix_k: Tensor,
    prefix_v: Tensor,
    scaling: float | None,
    kwargs: dict[str, Any],
    who: str,
) -> tuple[Tensor, None]:
    """Self-attention of one layer over its prefix rows ``[Hkv, m, d]`` and the current tokens,
    with transformers' mask converted to a key padding mask; the output in transformers' layout
    ``[B, n, Hq, d]``. `who` names the caller in errors."""
    n = query.shape[2]
    if key.shape[2] != n:
        raise NotImplementedError(
            f"peftkern: {who} covers self-attention over the current tokens only (training, scoring); "
            f"got {n} queries and {key.shape[2]} keys (a KV cache or cross-attention); "
            "to generate, pass use_cache=False (each step then attends over the whole sequence)"
        )
    # As transformers' SDPA path: a call's is_causal wins, then the module's (decoders: True).
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    out = prefix_attention(
        query,
        key,
        value,
        prefix_k.to(query.dtype),
        prefix_v.to(query.dtype),
        causal=causal,
        key_padding_mask=padding_mask(attention_mask, causal, n, who),
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None
