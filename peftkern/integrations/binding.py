"""Replacing the forward of one module instance, the one way every integration does it.

A bound forward is an instance attribute ``forward`` that shadows the class's method, so the
module's parameters, children, state_dict keys and hooks stay exactly as they were, and
deleting the attribute restores the class's forward. It is a `BoundForward` object rather than
``types.MethodType``: pickle stores a bound method as "look this name up on the object", which
fails while the object is being rebuilt, whereas a `BoundForward` pickles by value (the module
by reference, the function by its qualified name). So ``pickle``, ``torch.save`` of a whole
model, ``copy.deepcopy`` and multiprocessing give back a module that still runs the same
forward. Whether a module runs a given function is `bound_function(module) is function`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn


class BoundForward:
    """``module.forward`` replaced by ``function(module, *args, **kwargs)``.

    `prepare` (a module-level function, or None) is called when the forward is bound and again
    whenever a pickled or copied one is rebuilt: what the process needs before the forward can
    run, e.g. an attention function registered with transformers by name."""

    def __init__(
        self, module: nn.Module, function: Callable[..., Any], prepare: Callable[[], None] | None = None
    ) -> None:
        self.module = module
        self.function = function
        self.prepare = prepare
        if prepare is not None:
            prepare()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # The class forward's: callers that read the signature (Trainer does, to decide which
        # arguments to pass) see the module as it was.
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "function": self.function, "prepare": self.prepare}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.prepare is not None:
            self.prepare()

    def __repr__(self) -> str:
        return f"BoundForward({self.function.__module__}.{self.function.__qualname__})"


def bind(module: nn.Module, function: Callable[..., Any], prepare: Callable[[], None] | None = None) -> None:
    """Makes `module` run ``function(module, ...)`` as its forward (see `BoundForward`)."""
    # Through __dict__: nn.Module.__setattr__ would do the same for a non-Module, non-Tensor
    # value, but this says plainly that it is an instance attribute.
    module.__dict__["forward"] = BoundForward(module, function, prepare)


def bound_function(module: nn.Module) -> Callable[..., Any] | None:
    """The function `bind` installed as `module`'s forward, or None (also when something else,
    e.g. an accelerate hook, replaced the forward)."""
    forward = module.__dict__.get("forward")
    return forward.function if isinstance(forward, BoundForward) else None


def unbind(module: nn.Module) -> bool:
    """Restores the class's forward where `bind` replaced it; returns whether it had to."""
    if bound_function(module) is None:
        return False
    del module.__dict__["forward"]
    return True
