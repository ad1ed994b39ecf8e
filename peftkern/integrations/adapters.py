"""inject_adapters: bottleneck adapters (Houlsby / Pfeiffer) in a plain transformers model.

BERT-style encoders (post-LN): each layer's attention output block (``BertSelfOutput``) and
FFN output block (``BertOutput``) compute ``LN(x + dropout(dense(h)))``. The adapter reads the
dropout output ``y`` before the residual and layer norm, as in the papers and the ``adapters``
library; see `AdapterConfig` for the exact Houlsby and Pfeiffer formulas. The block keeps its
own parameters and names (the adapter is a new child ``adapter``), only its forward is bound
anew on the instance, so the base ``state_dict`` keys do not change.

Llama-style decoders (pre-LN): the residual and norm are outside the sublayer, so the adapter
is applied to the output of ``self_attn.o_proj`` / ``mlp.down_proj`` (``y + A(y)``) through a
forward hook, with the adapter stored as ``self_attn.adapter`` / ``mlp.adapter``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import Tensor, nn

from peftkern.integrations.binding import bind
from peftkern.integrations.summary import InjectSummary
from peftkern.nn import HOULSBY, PFEIFFER, AdapterConfig, BottleneckAdapter

Layout = Literal["houlsby", "pfeiffer"]
_CONFIGS = {"houlsby": HOULSBY, "pfeiffer": PFEIFFER}


class AdapterSummary(InjectSummary):
    """What inject_adapters did: trainable parameters and the blocks that got an adapter."""

    what = "adapters"


def _houlsby_forward(self: nn.Module, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    y = self.dropout(self.dense(hidden_states))
    # LN(x + y + A(y)): the adapter's own residual is y, the block's residual x is folded in.
    return self.LayerNorm(self.adapter(y, residual=input_tensor + y))


def _pfeiffer_forward(self: nn.Module, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    y = self.dropout(self.dense(hidden_states))
    summed = input_tensor + y
    # LN(x + y + A(LN(x + y))): the adapter reads the normed output, the same LN is applied again.
    return self.LayerNorm(self.adapter(self.LayerNorm(summed), residual=summed))


def _after_output_hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return module.peftkern_adapter_owner.adapter(output)


def _is_post_ln_block(module: Any) -> bool:
    return all(
        isinstance(getattr(module, a, None), m)
        for a, m in (("dense", nn.Linear), ("dropout", nn.Dropout), ("LayerNorm", nn.LayerNorm))
    )


def _bert_blocks(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, position, block) for every BERT-style layer: ``attention.output`` and ``output``."""
    blocks = []
    for name, layer in model.named_modules():
        attention_output = getattr(getattr(layer, "attention", None), "output", None)
        if _is_post_ln_block(attention_output) and _is_post_ln_block(getattr(layer, "output", None)):
            blocks.append((f"{name}.attention.output", "attention_output", attention_output))
            blocks.append((f"{name}.output", "ffn_output", layer.output))
    return blocks


def _llama_blocks(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, position, owner) for every Llama-style layer: ``self_attn`` (o_proj) and ``mlp`` (down_proj)."""
    blocks = []
    for name, layer in model.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if isinstance(getattr(attn, "o_proj", None), nn.Linear) and isinstance(
            getattr(mlp, "down_proj", None), nn.Linear
        ):
            blocks.append((f"{name}.self_attn", "attention_output", attn))
            blocks.append((f"{name}.mlp", "ffn_output", mlp))
    return blocks


def _output_linear(owner: nn.Module, position: str, post_ln: bool) -> nn.Linear:
    """The linear layer whose output the adapter reads (its width is the adapter's)."""
    if post_ln:
        return owner.dense
    return owner.o_proj if position == "attention_output" else owner.down_proj


def _resolve(
    config: Layout | AdapterConfig, reduction_factor: float | None, init: str | None
) -> tuple[AdapterConfig, Layout]:
    if isinstance(config, str):
        if config not in _CONFIGS:
            raise ValueError(
                f"peftkern: inject_adapters config must be 'houlsby', 'pfeiffer' or an AdapterConfig, got {config!r}"
            )
        layout: Layout = config
        config = _CONFIGS[config]
    elif isinstance(config, AdapterConfig):
        # A custom config takes Pfeiffer's layer-norm placement when it has Pfeiffer's
        # positions (after the FFN only), Houlsby's otherwise.
        layout = "pfeiffer" if tuple(config.positions) == ("ffn_output",) else "houlsby"
    else:
        raise ValueError(
            "peftkern: inject_adapters config must be 'houlsby', 'pfeiffer' or an AdapterConfig, "
            f"got {type(config).__name__}"
        )
    changes = {k: v for k, v in (("reduction_factor", reduction_factor), ("init", init)) if v is not None}
    return dataclasses.replace(config, **changes), layout


def inject_adapters(
    model: nn.Module,
    config: Layout | AdapterConfig = "houlsby",
    *,
    reduction_factor: float | None = None,
    init: Literal["bert", "houlsby", "zeros_up"] | None = None,
    **adapter_kwargs: Any,
) -> AdapterSummary:
    """Inserts `BottleneckAdapter`s into every layer of `model` in place, at the positions of
    `config` (``"houlsby"``: after the attention output and after the FFN; ``"pfeiffer"``: after
    the FFN only; or an `AdapterConfig`), and freezes every other parameter.

    `reduction_factor` and `init` override the config's; other keyword arguments go to
    `BottleneckAdapter` (``scaling``, ``dropout``, ``learned_scaling``, ...). With
    ``init="zeros_up"`` the model equals the original at initialisation. Adapters are created
    on the device and in the dtype of the block they follow.

    Supports BERT-style encoders (``attention.output`` / ``output`` blocks with ``dense``,
    ``dropout``, ``LayerNorm``) and Llama-style decoders (``self_attn.o_proj``, ``mlp.down_proj``);
    anything else is a ValueError."""
    config, layout = _resolve(config, reduction_factor, init)
    post_ln = _bert_blocks(model)
    blocks = post_ln or _llama_blocks(model)
    if not blocks:
        raise ValueError(
            f"peftkern: inject_adapters: {type(model).__name__} is neither a BERT-style encoder (layers with "
            "attention.output and output blocks of dense/dropout/LayerNorm) nor a Llama-style decoder "
            "(layers with self_attn.o_proj and mlp.down_proj)"
        )
    if any(hasattr(owner, "adapter") for _, _, owner in blocks):
        raise ValueError(
            "peftkern: inject_adapters: the model already has adapters (a block has an `adapter` child)"
        )
    # Build every adapter before changing the model, so a bad argument leaves it untouched.
    # One build_layer per transformer layer: the config decides which positions get one.
    chosen: list[tuple[str, nn.Module, nn.Linear, BottleneckAdapter]] = []
    for start in range(0, len(blocks), 2):
        layer = {
            position: (name, owner, _output_linear(owner, position, post_ln))
            for name, position, owner in blocks[start : start + 2]
        }
        weight = layer["ffn_output"][2].weight
        built = config.build_layer(
            weight.shape[0], device=weight.device, dtype=weight.dtype, **adapter_kwargs
        )
        chosen += [(*layer[position], adapter) for position, adapter in built.items()]
    model.requires_grad_(False)
    forward = _pfeiffer_forward if layout == "pfeiffer" else _houlsby_forward
    for _, owner, linear, adapter in chosen:
        owner.adapter = adapter
        if post_ln:
            bind(owner, forward)
        else:
            # A plain attribute, not a submodule: the hook finds the adapter through its owner,
            # so the adapter is registered (and saved) once, under the owner.
            object.__setattr__(linear, "peftkern_adapter_owner", owner)
            linear.register_forward_hook(_after_output_hook)
        adapter.requires_grad_(True)
    return AdapterSummary.of(model, [name for name, _, _, _ in chosen])
