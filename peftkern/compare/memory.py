"""Training memory of one method, measured and split the way the cost of fine-tuning is argued
about: parameters, gradients, optimiser state and activations.

Each part is counted from the tensors that hold it, by their storage (a storage shared by two
tensors, e.g. tied weights or views, counts once):
- parameters: every parameter of the model, frozen or not;
- gradients: the `.grad` of every trainable parameter after the first backward;
- optimiser state: every tensor in the optimiser's state after its first step (AdamW: two
  moments per parameter and a step counter per tensor);
- activations: what autograd saves for backward in the first step (`saved_tensors_hooks`),
  parameters excluded.
Shapes are the same every step, so the first full step is representative. On the CPU the total
is the sum of the parts (each at its own peak: an upper bound of what is live at once, short of
the transient buffers of a kernel); on a GPU it is the allocator's peak over the whole training
run (`torch.cuda.max_memory_allocated`), which also holds the data and every temporary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PeakMemory:
    """Bytes."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    total: int

    def mib(self) -> dict[str, float]:
        return {name: value / 2**20 for name, value in vars(self).items()}


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class MemoryMeter:
    """Counts the parts during the first training step: wrap its forward in `counting()`, call
    `after_backward()` and `after_optimizer_step()`, then read `result()`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: dict[int, int] = {}
        self.gradients = self.optimizer_state = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def counting(self) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(t: Tensor) -> Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_storages:
                self.saved[ptr] = t.untyped_storage().nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def after_backward(self) -> None:
        self.gradients = storage_bytes(p.grad for p in self.model.parameters() if p.grad is not None)

    def after_optimizer_step(self) -> None:
        state = self.optimizer.state.values()
        self.optimizer_state = storage_bytes(
            v for per_param in state for v in per_param.values() if isinstance(v, Tensor)
        )

    def result(self) -> PeakMemory:
        parameters = storage_bytes(self.model.parameters())
        activations = sum(self.saved.values())
        parts = parameters + self.gradients + self.optimizer_state + activations
        total = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else parts
        return PeakMemory(parameters, self.gradients, self.optimizer_state, activations, total)
