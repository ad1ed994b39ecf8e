"""inject_lora: turn a plain model into a LoRA model in place with peftkern's LoRALinear."""

from __future__ import annotations

import torch
from torch import nn

from peftkern.integrations.summary import InjectSummary
from peftkern.integrations.targets import TargetModules, select_linear_targets
from peftkern.nn import DoRALinear, LoRALinear


class LoRASummary(InjectSummary):
    """What inject_lora did: the parameters left trainable and the modules it replaced."""

    what = "LoRA"


def replace_with_lora(
    model: nn.Module,
    names: list[str],
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    use_rslora: bool,
    adapter_dtype: torch.dtype | None = None,
    use_dora: bool = False,
) -> None:
    """Swaps each named nn.Linear for a LoRALinear (DoRALinear with `use_dora`) sharing its
    weight and bias, then freezes every parameter that is not a LoRA factor or a DoRA magnitude."""
    layer_class = DoRALinear if use_dora else LoRALinear
    # Build every layer before swapping any, so a bad r or dropout leaves the model unchanged.
    layers = {
        name: layer_class.from_linear(
            model.get_submodule(name),
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
        )
        for name in names
    }
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for module in model.modules():
        is_lora = isinstance(module, LoRALinear)
        for pname, p in module.named_parameters(recurse=False):
            p.requires_grad_(is_lora and pname in ("lora_A", "lora_B", "magnitude"))


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules = ("q_proj", "v_proj"),
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype | None = None,
    use_dora: bool = False,
) -> LoRASummary:
    """Replaces the matching `nn.Linear` modules of `model` by `LoRALinear` in place and
    freezes everything else. The model then equals the original at initialisation (B = 0).

    `target_modules`: a regex str (full match against the module name) or a list of names
    matched exactly or as a dotted suffix, as in `peft.LoraConfig`. `adapter_dtype`
    (e.g. torch.float32 on a bf16 model, as peft does by default) keeps the adapters in
    another dtype than the base weights. `use_dora` injects `DoRALinear` layers (weight-decomposed
    LoRA, peft's `use_dora=True`): a trainable magnitude per output feature besides A and B.
    """
    names = select_linear_targets(model, target_modules)
    replace_with_lora(
        model,
        names,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        adapter_dtype=adapter_dtype,
        use_dora=use_dora,
    )
    return LoRASummary.of(model, names)
