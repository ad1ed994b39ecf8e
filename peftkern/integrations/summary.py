"""The summary every inject_* function returns: what is trainable now, and what was changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from peftkern.nn import count_trainable


@dataclass
class InjectSummary:
    """Parameters left trainable after an injection, and the modules it changed."""

    trainable_params: int
    total_params: int
    replaced: list[str] = field(default_factory=list)
    what: ClassVar[str] = "PEFT"  # the method's name in __str__; each subclass names its own

    @classmethod
    def of(cls, model: nn.Module, replaced: list[str]) -> InjectSummary:
        """The summary of `model` as it is now (shared parameters counted once)."""
        trainable, total = count_trainable(model)
        return cls(trainable, total, replaced)

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {self.trainable_share:.4f} || {self.what} on {len(self.replaced)} modules"
        )
