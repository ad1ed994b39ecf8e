"""merge_and_unload: fold every LoRA adapter into its base weight and return to nn.Linear."""

from __future__ import annotations

import torch
from torch import nn

from peftkern.nn import LoRALinear


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges each `LoRALinear` of `model` (``W += s·B·A``) and replaces it in place by an
    `nn.Linear` holding the same weight and bias Parameters (no copy of W). Returns `model`."""
    lora_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in lora_layers:
        layer.merge()
        # Built on the meta device, then given the merged Parameters: no second weight in memory.
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        if not name:
            return linear
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model
