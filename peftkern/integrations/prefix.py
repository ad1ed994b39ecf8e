"""inject_prefix: prefix tuning in a plain transformers model through its attention registry.

transformers models call their attention through ``ALL_ATTENTION_FUNCTIONS`` with the
projected ``q, k, v [B, H, n, d]``; registering ``"peftkern_prefix"`` there and switching the
model to it gives every self-attention layer m trainable key/value rows (peftkern's
concat-free `prefix_attention`) without copying any model code. The rows of all layers come
from one `PrefixEncoder` (``model.peftkern_prefix``), evaluated once per forward call by a
pre-hook on the base model and read by each layer through its ``layer_idx``.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from peftkern.integrations.hf_attention import attend_with_prefix, attention_layers, switch_attention
from peftkern.integrations.summary import InjectSummary
from peftkern.nn import PrefixEncoder

ATTENTION_NAME = "peftkern_prefix"
WHO = "inject_prefix"


class PrefixSummary(InjectSummary):
    """What inject_prefix did: trainable parameters (the prefix encoder) and the attention layers."""

    what = "prefix"


class _PrefixRows:
    """Every layer's (P_K, P_V) of the current forward call, shared by the attention layers.
    A plain object, not a Module: the tensors are activations, not state to save."""

    def __init__(self) -> None:
        self.layers: list[tuple[Tensor, Tensor]] | None = None

    def __deepcopy__(self, memo: dict) -> _PrefixRows:
        # A copied model gets its own, empty holder (shared by its layers through the memo):
        # the rows of the last call are activations of the original, not state.
        return _PrefixRows()


class _ComputeRows:
    """The base model's forward pre-hook: every layer's rows, once per forward call, before any
    layer runs (the MLP reparameterisation is not re-run per layer, and gradient
    checkpointing's recomputation reuses these rows). An object rather than a closure so that
    copy.deepcopy(model) points the copy's hook at the copy's own encoder and holder."""

    def __init__(self, model: nn.Module, rows: _PrefixRows) -> None:
        self.model = model
        self.rows = rows

    def __call__(self, _module: nn.Module, _args: Any) -> None:
        self.rows.layers = self.model.peftkern_prefix()


def peftkern_prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered as ``"peftkern_prefix"`` (transformers' signature)."""
    rows: _PrefixRows | None = getattr(module, "peftkern_prefix_rows", None)
    if rows is None or rows.layers is None:
        raise RuntimeError(
            f"peftkern: {type(module).__name__} runs the peftkern_prefix attention but has no prefix rows; "
            "call the model inject_prefix was given (its pre-hook computes the rows)"
        )
    if dropout > 0.0 and module.training:
        # The fused kernel has no attention-probability dropout; say so rather than pretend.
        warnings.warn("peftkern: inject_prefix does not apply attention dropout", stacklevel=2)
    prefix_k, prefix_v = rows.layers[module.layer_idx]
    return attend_with_prefix(
        module, query, key, value, attention_mask, prefix_k, prefix_v, scaling, kwargs, who=WHO
    )


def inject_prefix(
    model: nn.Module,
    num_virtual_tokens: int = 20,
    projection_hidden: int | None = None,
    *,
    init: str = "normal",
) -> PrefixSummary:
    """Gives every self-attention layer of the transformers `model` `num_virtual_tokens`
    trainable key/value prefix rows, in place, and freezes every other parameter.

    The rows are `model.peftkern_prefix`, a `PrefixEncoder` (with `projection_hidden`, the MLP
    reparameterisation of the prefix-tuning paper; ``peftkern_prefix.eject()`` drops the MLP
    after training). Works for models that use transformers' attention interface (BERT-style
    encoders, Llama-style decoders, ...), with padding masks, causal masks and gradient
    checkpointing. Not covered: KV-cache generation (generate with ``use_cache=False``),
    cross-attention, attention dropout.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"peftkern: inject_prefix needs a transformers PreTrainedModel, got {type(model).__name__}"
        )
    if getattr(config, "add_cross_attention", False):
        raise ValueError(
            "peftkern: inject_prefix: models with cross-attention (add_cross_attention=True) are not supported"
        )
    if hasattr(model, "peftkern_prefix"):
        raise ValueError("peftkern: inject_prefix: the model already has a prefix (model.peftkern_prefix)")
    num_layers, num_heads = config.num_hidden_layers, config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    try:
        layers = attention_layers(model, num_layers)
    except ValueError as error:
        raise ValueError(f"peftkern: {WHO}: {error}") from None
    weight = next(model.parameters())
    # Built first: a bad num_virtual_tokens or init leaves the model unchanged.
    encoder = PrefixEncoder(
        num_layers,
        num_kv_heads,
        head_dim,
        num_virtual_tokens,
        projection_hidden,
        init,
        device=weight.device,
        dtype=weight.dtype,
    )
    if not switch_attention(model, ATTENTION_NAME, peftkern_prefix_attention):
        raise ValueError(
            f"peftkern: inject_prefix: {type(model).__name__} does not use transformers' attention interface"
        )
    model.requires_grad_(False)
    model.peftkern_prefix = encoder
    rows = _PrefixRows()
    for _, module in layers:
        module.peftkern_prefix_rows = rows
    # On the base model, which every task head calls, so model.bert(...) works as well.
    getattr(model, "base_model", model).register_forward_pre_hook(_ComputeRows(model, rows))
    return PrefixSummary.of(model, [name for name, _ in layers])
