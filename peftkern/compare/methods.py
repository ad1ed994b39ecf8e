"""The fine-tuning methods `peftkern compare` knows, as one registry.

A method is a name, a learning rate, and `apply(model)`: it is called on the pretrained
model after every parameter has been frozen, and makes trainable (or inserts) what the
method trains. The task head (the parameters the checkpoint did not have, e.g. a new
classifier) is unfrozen afterwards for every method, so "head-only" is the floor each method
is measured against. Learning rates are the usual ones for each kind of method: low for
full fine-tuning, higher for the small adapters, which start from zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import peftkern
from peftkern.compare.data import TaskKind
from peftkern.errors import UsageError

# Attention projections LoRA adapts by default (q and v, as in the LoRA paper), in BERT
# naming and in Llama/Mistral/Qwen naming.
LORA_TARGETS = ("query", "value", "q_proj", "v_proj")
LORA_RANK = 8
LORA_ALPHA = 16.0
# Adapters start as the identity (zero up-projection), as LoRA starts at B = 0, so every
# method begins from the pretrained model's own function.
ADAPTER_INIT = "zeros_up"
PREFIX_TOKENS = 20  # num_virtual_tokens
PREFIX_HIDDEN = 128  # width of prefix-mlp's reparameterisation MLP


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    lr: float
    apply: Callable[[nn.Module], None]
    kinds: tuple[TaskKind, ...] = ("classification", "causal-lm")


def _full(model: nn.Module) -> None:
    model.requires_grad_(True)


def _head_only(model: nn.Module) -> None:
    """Nothing beyond the task head, which every method trains."""


def _injected(name: str, inject: Callable[[nn.Module], object]) -> Callable[[nn.Module], None]:
    """`apply` from a peftkern.inject_* call; an architecture it does not cover is a UsageError
    (one line on the command line), naming the method."""

    def apply(model: nn.Module) -> None:
        try:
            inject(model)
        except ValueError as error:
            raise UsageError(f"{name}: {error}") from None

    return apply


_lora = _injected(
    "lora",
    lambda model: peftkern.inject_lora(model, list(LORA_TARGETS), r=LORA_RANK, lora_alpha=LORA_ALPHA),
)
_houlsby = _injected("houlsby", lambda model: peftkern.inject_adapters(model, "houlsby", init=ADAPTER_INIT))
_pfeiffer = _injected(
    "pfeiffer", lambda model: peftkern.inject_adapters(model, "pfeiffer", init=ADAPTER_INIT)
)
_prefix = _injected("prefix", lambda model: peftkern.inject_prefix(model, PREFIX_TOKENS))
_prefix_mlp = _injected(
    "prefix-mlp", lambda model: peftkern.inject_prefix(model, PREFIX_TOKENS, projection_hidden=PREFIX_HIDDEN)
)


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


def available(kind: TaskKind) -> list[Method]:
    return [m for m in METHODS.values() if kind in m.kinds]


def select(names: list[str] | None, kind: TaskKind) -> list[Method]:
    """The methods named (in that order), or every one fit for the task; a name that is
    unknown or unfit for the task is a UsageError."""
    if not names:
        return available(kind)
    chosen = []
    for name in names:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        method = METHODS[name]
        if kind not in method.kinds:
            raise UsageError(f"method {name!r} does not apply to a {kind} task")
        chosen.append(method)
    return chosen


# The floor first, then by growing trainable share. Head-only has no meaning for a causal LM,
# whose head is the (often tied) token embedding.
register(
    Method(
        "head-only", "train the new task head only (the floor)", 5e-3, _head_only, kinds=("classification",)
    )
)
register(
    Method(
        "lora",
        f"LoRA r={LORA_RANK} on the q and v projections (peftkern.inject_lora)",
        2e-3,
        _lora,
    )
)
register(
    Method(
        "houlsby",
        "Houlsby adapters after attention and FFN (peftkern.inject_adapters)",
        1e-3,
        _houlsby,
    )
)
register(
    Method(
        "pfeiffer",
        "Pfeiffer adapters after the FFN (peftkern.inject_adapters)",
        1e-3,
        _pfeiffer,
    )
)
register(
    Method(
        "prefix",
        f"prefix tuning, {PREFIX_TOKENS} rows per layer trained directly (peftkern.inject_prefix)",
        5e-3,
        _prefix,
    )
)
register(
    Method(
        "prefix-mlp",
        f"prefix tuning with an MLP reparameterisation, hidden {PREFIX_HIDDEN} (peftkern.inject_prefix)",
        1e-3,
        _prefix_mlp,
    )
)
register(Method("full", "full fine-tuning of every parameter", 1e-4, _full))
