"""Which modules of a model a LoRA target specification selects, matched as `peft` does."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

TargetModules = str | Sequence[str]


def name_matches(name: str, target_modules: TargetModules) -> bool:
    """A str is a regular expression that must match the whole module name; a list or tuple
    holds names that match exactly or as a dotted suffix (``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"``). These are `peft`'s rules, so one config means
    the same modules in both libraries."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear computing ``x·Wᵀ + b``. Subclasses that keep nn.Linear's forward (e.g.
    NonDynamicallyQuantizableLinear) qualify; ones that override it (quantized layers) would
    be silently wrong under LoRALinear, which calls the op on `weight` directly."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def select_linear_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the `nn.Linear` modules `target_modules` selects, in model order.

    Raises ValueError when nothing matches (listing the linear modules that exist) or when a
    match is not an `nn.Linear` (a container, a Conv1D, an already injected layer)."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"peftkern: target_modules {target_modules!r} is not a valid regular expression: {exc}"
            ) from exc
    elif not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(
            f"peftkern: target_modules must be a regex str or a non-empty list of names, got {target_modules!r}"
        )
    selected: list[str] = []
    for name, module in model.named_modules():
        if not name or not name_matches(name, target_modules):
            continue
        if not is_plain_linear(module):
            raise ValueError(
                f"peftkern: target_modules {target_modules!r} matches {name!r}, a {type(module).__name__}; "
                "only nn.Linear modules can take LoRA"
            )
        selected.append(name)
    if not selected:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"peftkern: target_modules {target_modules!r} matches no module of {type(model).__name__}; "
            f"its nn.Linear module names end in: {', '.join(linears) or '(none)'}"
        )
    return selected
