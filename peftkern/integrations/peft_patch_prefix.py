"""patch_peft for `peft` prefix-tuning models: the prefix rows go to peftkern's concat-free
attention instead of into a KV cache.

peft's ``PeftModelForCausalLM.forward`` evaluates its prompt encoder, repeats the result for
every example, wraps it in a ``DynamicCache`` as ``past_key_values`` and widens the attention
mask by ``m`` columns; every layer then concatenates ``[P_K; K]``, ``[P_V; V]``. Patched, the
forward (an instance attribute shadowing the class method, as for LoRA layers) evaluates the
same prompt encoder once per call (no batch copy), passes the rows of every layer to the base
model as a keyword argument that transformers carries down to each attention call (and into
gradient checkpointing's recomputation), and the base model's attention implementation,
switched to ``"peftkern_peft_prefix"``, consumes them with `prefix_attention`. Positions are
shifted by ``m`` exactly as the cache would shift them. A call without the rows (peft's own
forward, ``generate``, ``disable_adapter``) runs transformers' SDPA function with SDPA's mask,
unchanged. Parameters, module tree, state_dict keys and save_pretrained/from_pretrained stay
exactly peft's.

The swapped forward re-checks on every call what it covers and hands anything else to peft's
forward (with a warning naming the reason): a requested KV cache (``use_cache=True``, a cache
passed in), ``output_attentions=True``, 4-D attention masks, attention dropout in training,
several adapters, and a call too long for a sliding window (``m + n`` above it: the window
would hide prefix rows, which the op always shows). Unlike peft's forward, a patched call
returns no KV cache (``cache`` is None): peft's forward replaces any cache passed to it
anyway, so continuing from one goes through ``generate``, which never runs this forward.
Which model families are covered, and what differs between them, is `prefix_models`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from peftkern.integrations.binding import bind, bound_function, unbind
from peftkern.integrations.hf_attention import (
    attend_with_prefix,
    attention_layers,
    register_attention,
    restore_attention_implementation,
    switch_attention,
)
from peftkern.integrations.prefix_models import FAMILIES, sliding_window, unsupported_attention

ATTENTION_NAME = "peftkern_peft_prefix"
ROWS_KWARG = "peftkern_prefix_rows"
WHO = "patch_peft (prefix tuning)"

# The attention implementation the patched model falls back to when a call carries no rows.
ORIGINAL_ATTENTION = "sdpa"
# Arguments that make peft's forward do something this forward does not reproduce.
_CACHE_ARGUMENTS = ("past_key_values", "cache", "cache_position")


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered as ``"peftkern_peft_prefix"``: prefix attention when
    the call carries the prefix rows (a patched forward), transformers' SDPA otherwise."""
    rows = kwargs.pop(ROWS_KWARG, None)
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout > 0.0:
        # The patched forward hands training with attention dropout to peft; this is a bug.
        raise RuntimeError(f"peftkern: {WHO}: attention dropout {dropout} reached the prefix attention")
    prefix_k, prefix_v = (
        t.to(query.device) for t in rows[module.layer_idx]
    )  # layers may sit on other devices
    # The patched forward hands these calls to peft (prefix_models); reaching here is a bug.
    window = kwargs.get("sliding_window")
    if window is not None and prefix_k.shape[1] + query.shape[2] > window:
        raise RuntimeError(f"peftkern: {WHO}: a sliding window {window} reached the prefix attention")
    if kwargs.get("softcap") is not None:
        raise RuntimeError(f"peftkern: {WHO}: logit soft-capping reached the prefix attention")
    return attend_with_prefix(
        module, query, key, value, attention_mask, prefix_k, prefix_v, scaling, kwargs, who=WHO
    )


def _peft_classes() -> tuple[type, Any]:
    try:
        from peft import PeftModelForCausalLM
        from peft.utils import PeftType
    except ImportError as exc:
        raise ImportError("peftkern: patch_peft needs the `peft` package (pip install peft)") from exc
    return PeftModelForCausalLM, PeftType


def is_prompt_learning(peft_model: nn.Module) -> bool:
    """Whether patch_peft should hand `peft_model` to this module (a peft prompt-learning model)."""
    configs = getattr(peft_model, "peft_config", None)
    return isinstance(configs, dict) and any(
        getattr(c, "is_prompt_learning", False) for c in configs.values()
    )


def report_key(peft_model: nn.Module) -> str:
    """The name a whole prefix-tuning model is reported under when it is skipped."""
    return f"prompt_encoder.{getattr(peft_model, 'active_adapter', 'default')}"


def _static_reason(peft_model: nn.Module) -> str | None:
    """Why peftkern can never run this model's prefix (checked once, at patch time)."""
    causal_lm_cls, peft_type = _peft_classes()
    configs = peft_model.peft_config
    if len(configs) != 1:
        return f"{len(configs)} adapters (peftkern covers a model with exactly one prefix-tuning adapter)"
    config = peft_model.active_peft_config
    if config.peft_type != peft_type.PREFIX_TUNING:
        return f"peft type {config.peft_type.value} (peftkern covers LoRA and prefix tuning)"
    if type(peft_model) is not causal_lm_cls:
        return (
            f"{type(peft_model).__name__} (task {config.task_type}); "
            "peftkern covers prefix tuning of CAUSAL_LM models (PeftModelForCausalLM)"
        )
    if config.num_transformer_submodules != 1:
        return f"num_transformer_submodules={config.num_transformer_submodules} (encoder-decoder)"
    base = peft_model.get_base_model()
    model_config = base.config
    model_type = getattr(model_config, "model_type", None)
    # First: the reason a user can act on (Gemma 2 soft-caps, and is no family for that reason).
    unsupported = unsupported_attention(model_config)
    if unsupported is not None:
        return unsupported
    family = FAMILIES.get(model_type)
    if family is None:
        return f"model type {model_type!r} (peftkern's prefix path is verified for {', '.join(FAMILIES)})"
    implementation = model_config._attn_implementation
    if implementation != ORIGINAL_ATTENTION:
        return (
            f"attention implementation {implementation!r} "
            f"(peftkern's prefix path takes over from {ORIGINAL_ATTENTION!r} only)"
        )
    num_layers = model_config.num_hidden_layers
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    heads = config.num_attention_heads
    if (config.num_layers, heads, config.token_dim) != (num_layers, num_kv_heads, num_kv_heads * head_dim):
        return (
            f"prefix shaped for {config.num_layers} layers x {heads} heads x token_dim {config.token_dim}, "
            f"model has {num_layers} layers x {num_kv_heads} key/value heads x head_dim {head_dim}"
        )
    try:
        attention_layers(base, num_layers, (family.projection,))
    except ValueError as error:
        return str(error)
    return None


def _call_reason(
    model: nn.Module,
    num_tokens: int,
    attention_mask: Tensor | None,
    output_attentions: bool | None,
    kwargs: dict,
) -> str | None:
    """Why this call must go to peft's forward."""
    if len(model.peft_config) != 1 or model.active_adapter != model.__dict__["_peftkern_prefix_adapter"]:
        return "the adapters changed since patching (peftkern covers exactly one prefix-tuning adapter)"
    if model.get_base_model().config._attn_implementation != ATTENTION_NAME:
        return "the base model's attention implementation was changed after patching"
    if kwargs.get("use_cache"):
        return "use_cache=True (a KV cache holding the prefix was asked for)"
    for name in _CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return f"{name} passed (KV cache)"
    if output_attentions:
        return "output_attentions=True (the fused attention returns no attention weights)"
    if attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-D attention mask (peftkern takes a 2-D padding mask)"
    config = model.get_base_model().config
    dropout = getattr(config, FAMILIES[config.model_type].dropout, 0.0) or 0.0
    if model.training and dropout > 0.0:
        return f"attention dropout {dropout} in training (the fused attention has none)"
    window = sliding_window(config)
    m = model.active_peft_config.num_virtual_tokens
    if window is not None and m + num_tokens > window:
        return (
            f"{m} prefix rows + {num_tokens} tokens exceed the sliding window {window} "
            "(the window would hide prefix rows)"
        )
    return None


def prefix_rows(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Every layer's ``(P_K, P_V)``, each ``[num_kv_heads, m, head_dim]``, from peft's prompt
    encoder exactly as peft's ``get_prompt`` computes them, once for the whole batch."""
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    encoder = model.prompt_encoder[adapter]
    m, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    if config.inference_mode:  # peft keeps the encoder's output as its embedding table then
        flat = encoder.embedding.weight
    else:
        tokens = model.prompt_tokens[adapter][:m].to(encoder.embedding.weight.device)
        flat = encoder(tokens)  # [m, layers·2·token_dim]
    dtype = model.base_model_torch_dtype
    if dtype is not None:
        flat = flat.to(dtype)
    rows = flat.view(m, layers * 2, heads, config.token_dim // heads).permute(
        1, 2, 0, 3
    )  # [2·layers, H, m, d]
    return [(rows[2 * layer], rows[2 * layer + 1]) for layer in range(layers)]


def _prefix_forward(
    self: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    task_ids: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    tokens = input_ids if input_ids is not None else inputs_embeds
    num_tokens = tokens.shape[1] if tokens is not None else 0
    reason = _call_reason(self, num_tokens, attention_mask, output_attentions, kwargs)
    if reason is not None:
        # Not silent: this call computes prefix tuning, through peft's cache. Python's warning
        # filter shows each reason once.
        warnings.warn(f"peftkern: a patched prefix-tuning model runs peft's forward: {reason}", stacklevel=2)
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            task_ids=task_ids,
            **kwargs,
        )
    config = self.active_peft_config
    if tokens is None:
        raise ValueError("peftkern: you must specify exactly one of input_ids or inputs_embeds")
    # peft's own adjustments: position_ids shifted by m, token_type_ids dropped (with its warnings).
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    if kwargs.get("position_ids") is None:
        # What the base model derives from a cache holding the m prefix rows.
        family = FAMILIES[self.get_base_model().config.model_type]
        kwargs["position_ids"] = family.positions(
            config.num_virtual_tokens, num_tokens, attention_mask, tokens.device
        )
    kwargs.pop("use_cache", None)
    kwargs[ROWS_KWARG] = prefix_rows(self)
    return self.base_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        labels=labels,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=return_dict,
        use_cache=False,
        **kwargs,
    )


def _register() -> None:
    """What a patched model needs in this process: its attention implementation registered
    (again, after the model was unpickled in a new process)."""
    register_attention(ATTENTION_NAME, _attention)


def is_patched(peft_model: nn.Module) -> bool:
    return bound_function(peft_model) is _prefix_forward


def patch_prefix(peft_model: nn.Module, report: Any) -> None:
    """patch_peft for a peft prompt-learning model: fills `report` (the attention layers that
    now take the prefix, or the whole model skipped with the reason)."""
    if is_patched(peft_model):
        report.patched += peft_model.__dict__["_peftkern_prefix_layers"]
        return
    if "forward" in peft_model.__dict__:
        report.skipped[report_key(peft_model)] = (
            "forward already replaced on the instance (e.g. inside disable_adapter)"
        )
        return
    reason = _static_reason(peft_model)
    if reason is not None:
        report.skipped[report_key(peft_model)] = reason
        return
    base = peft_model.get_base_model()
    projection = FAMILIES[base.config.model_type].projection
    layers = attention_layers(base, base.config.num_hidden_layers, (projection,))
    if not switch_attention(base, ATTENTION_NAME, _attention):
        report.skipped[report_key(peft_model)] = (
            f"{type(base).__name__} does not use transformers' attention interface"
        )
        return
    names = [f"base_model.{name}" for name, _ in layers]
    # Plain attributes (not modules or tensors): nothing enters the state_dict.
    peft_model.__dict__["_peftkern_prefix_adapter"] = peft_model.active_adapter
    peft_model.__dict__["_peftkern_prefix_layers"] = names
    bind(peft_model, _prefix_forward, prepare=_register)
    report.patched += names


def unpatch_prefix(peft_model: nn.Module) -> int:
    """Restores peft's forward and the base model's SDPA attention; returns how many attention
    layers took the prefix (0 when `peft_model` was not patched)."""
    if not is_patched(peft_model):
        return 0
    unbind(peft_model)
    del peft_model.__dict__["_peftkern_prefix_adapter"]
    names = peft_model.__dict__.pop("_peftkern_prefix_layers")
    restore_attention_implementation(peft_model.get_base_model(), ATTENTION_NAME, ORIGINAL_ATTENTION)
    return len(names)
