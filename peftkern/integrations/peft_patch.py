"""patch_peft: run a `peft` model through peftkern's kernels, in place. The entry point:
LoRA models are handled here (their Linear layers run the fused op), prefix-tuning models in
`peft_patch_prefix` (the prefix goes to the concat-free prefix attention).

Only the forward method of each covered layer is swapped (`binding.bind`: an instance attribute
shadowing the class method, which pickles and deep-copies with the model); parameters, module
tree, state_dict keys and save_pretrained/from_pretrained stay exactly peft's. The swapped
forward re-checks the layer's state on every call and hands anything it does not cover back to
peft's own forward, so a later merge, set_adapter, disable_adapter, adapter_names batch, or a
hook added to base_layer / lora_A / lora_B / lora_dropout (accelerate's offloading, activation
capture) stays correct.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftkern.functional import autocast_enabled, dora_linear, lora_linear
from peftkern.integrations import peft_patch_prefix
from peftkern.integrations.binding import bind, bound_function, unbind


@dataclass
class PatchReport:
    """Layers switched to peftkern, and layers left on peft's forward with the reason."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    method: str = "LoRA"  # what the patched layers run: "LoRA", or "prefix-attention" for prefix tuning

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        lines = [f"peftkern: patched {self.num_patched} {self.method} layers, skipped {self.num_skipped}"]
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  skipped {n}: {reason}" for reason, n in sorted(reasons.items())]
        return "\n".join(lines)


def _peft_lora_linear_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("peftkern: patch_peft needs the `peft` package (pip install peft)") from exc
    return Linear


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict)


def _static_reason(module: nn.Module, linear_cls: type) -> str | None:
    """Why peftkern can never run this layer (checked once, at patch time)."""
    if type(module) is not linear_cls:
        # peft's quantized (bnb, gptq, ...) and Conv/Embedding LoRA layers are subclasses or
        # siblings of LoraLayer with their own forward.
        return (
            f"{type(module).__module__}.{type(module).__name__} is not peft's plain LoRA Linear "
            "(quantized or non-Linear base)"
        )
    base = module.base_layer  # what the fused forward reads the weight and bias from
    if type(base) is not nn.Linear:
        return f"base layer is a {type(base).__name__}, not nn.Linear"
    if module.fan_in_fan_out:
        return "fan_in_fan_out=True (transposed base weight)"
    if "forward" in module.__dict__:
        return "forward already replaced on the instance (e.g. an accelerate hook)"
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run anything besides its class's forward: hooks of its own
    (forward, pre-forward, backward), or a forward replaced on the instance (accelerate's
    device-placement and offload hooks)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def _global_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook``, ...) exist."""
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _hooks_reason(module: nn.Module, name: str) -> str | None:
    """Why this call must go to peft: the fused op reads the weights of base_layer, lora_A and
    lora_B directly and never calls them (nor lora_dropout), so a hook on any of them, added
    before or after patching, would be bypassed; peft's forward calls each and runs it."""
    if _global_hooks():
        return "global module hooks registered"
    for child, sub in (
        ("base_layer", module.base_layer),
        ("lora_A", module.lora_A[name]),
        ("lora_B", module.lora_B[name]),
        ("lora_dropout", module.lora_dropout[name]),
    ):
        if _has_hooks(sub):
            return f"{child} has hooks (e.g. accelerate offloading, activation capture)"
    return None


def _state_reason(module: nn.Module) -> str | None:
    """Why peftkern cannot run this layer in its current state (checked at every call)."""
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters (peftkern fuses exactly one)"
    name = active[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights on this layer"
    variant = module.lora_variant.get(name)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return f"LoRA variant {type(variant).__name__} (peftkern fuses DoRA and plain LoRA)"
    if type(module.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(module.lora_dropout[name]).__name__}"
    return _hooks_reason(module, name)


def _operands(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """(x, weight, bias, lora_A, lora_B) of the active adapter, as the fused op takes them."""
    name = module.active_adapters[0]
    base = module.base_layer
    return x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight


def _autocast_on(x: Tensor) -> bool:
    return autocast_enabled(x.device.type)


def _argument_reason(args: tuple, kwargs: dict) -> str | None:
    """Why this particular call's arguments must go to peft."""
    if args or kwargs:
        return "extra forward arguments (e.g. adapter_names for mixed-adapter batches)"
    return None


def _dtype_reason(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> str | None:
    """Why this call's dtypes must go to peft (outside autocast)."""
    if x.dtype != weight.dtype or lora_B.dtype != lora_A.dtype:
        return "input and base weight, or lora_A and lora_B, differ in dtype"
    # peft keeps adapters of a float16/bfloat16 model in float32 by default
    # (autocast_adapter_dtype=True); the fused op takes exactly that combination.
    if lora_A.dtype != x.dtype and not (
        lora_A.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
    ):
        return f"LoRA weights in {lora_A.dtype} with input in {x.dtype}"
    return None


def _fused_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    peft_forward = type(self).forward
    if _state_reason(self) is not None:
        return peft_forward(self, x, *args, **kwargs)
    x_op, weight, bias, lora_A, lora_B = _operands(self, x)
    # Under autocast the fused op casts its operands as autocast casts peft's linears (float32
    # adapters stay float32), so only the call's arguments can rule it out.
    reason = _argument_reason(args, kwargs)
    if reason is None and not _autocast_on(x):
        reason = _dtype_reason(x_op, weight, lora_A, lora_B)
    if reason is not None:
        # Not silent: this call computes LoRA, only slower than it could. Python's warning
        # filter shows each reason once.
        warnings.warn(f"peftkern: a patched layer runs peft's forward: {reason}", stacklevel=2)
        return peft_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    scaling = self.scaling[name]
    if name in self.lora_variant:  # DoRA, the one variant _state_reason lets through
        magnitude = self.lora_magnitude_vector[name].weight
        if magnitude.dtype != lora_A.dtype:
            warnings.warn("peftkern: a patched layer runs peft's forward: DoRA magnitude dtype", stacklevel=2)
            return peft_forward(self, x, *args, **kwargs)
        return dora_linear(x_op, weight, lora_A, lora_B, magnitude, bias=bias, scaling=scaling, dropout=p)
    if self.lora_bias.get(name, False):
        # peft adds scaling·lora_B(h) with lora_B's bias inside: a constant row, which the
        # fused op takes as part of the bias (its gradient reaches both through autograd).
        lora_bias = (self.lora_B[name].bias * scaling).to(weight.dtype)
        bias = lora_bias if bias is None else bias + lora_bias
    return lora_linear(x_op, weight, lora_A, lora_B, bias=bias, scaling=scaling, dropout=p, training=True)


def _is_patched(module: nn.Module) -> bool:
    return bound_function(module) is _fused_forward


def patch_peft(peft_model: nn.Module) -> PatchReport:
    """Switches a `peft` model to peftkern's kernels in place.

    LoRA: every LoRA Linear layer runs peftkern's fused op. Prefix tuning (a CAUSAL_LM
    PeftModel of a model family in `prefix_models.FAMILIES`: Llama, Mistral, Qwen2, Gemma,
    Gemma 3, GPT-2, GPT-J, OPT): the prefix rows from peft's prompt encoder go to peftkern's
    prefix attention instead of a KV cache (see `peft_patch_prefix`).

    Returns a PatchReport: layers patched, and layers left on peft's forward with the reason
    (DoRA and other variants, quantized or non-Linear bases, lora_bias, merged layers, several
    active adapters, ...; for prompt learning the whole model, keyed ``prompt_encoder.<adapter>``:
    other prompt-learning methods, other model families or tasks, several adapters, ...).
    Calling it again is harmless; `unpatch_peft` undoes it."""
    if peft_patch_prefix.is_prompt_learning(peft_model):
        report = PatchReport(method="prefix-attention")
        peft_patch_prefix.patch_prefix(peft_model, report)
        return report
    linear_cls = _peft_lora_linear_class()
    report = PatchReport()
    for name, module in peft_model.named_modules():
        if not _is_lora_layer(module):
            continue
        if _is_patched(module):
            report.patched.append(name)
            continue
        reason = _static_reason(module, linear_cls) or _state_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        bind(module, _fused_forward)
        report.patched.append(name)
    return report


def unpatch_peft(peft_model: nn.Module) -> int:
    """Restores peft's forward on every layer patch_peft switched; returns how many."""
    restored = peft_patch_prefix.unpatch_prefix(peft_model)
    for module in peft_model.modules():
        if _is_patched(module):
            unbind(module)
            restored += 1
    return restored
