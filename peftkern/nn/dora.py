"""DoRALinear: weight-decomposed LoRA (DoRA) as a drop-in replacement for nn.Linear."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftkern.functional import dora_linear
from peftkern.nn.lora import LoRAInit, LoRALinear


class DoRALinear(LoRALinear):
    """``y = c⊙(x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ) + b`` with ``c = magnitude / ‖W + s·B·A‖`` per
    output row (the norm a constant; with dropout, peft's exact form, see
    :func:`peftkern.dora_linear`).

    A :class:`LoRALinear` plus a trainable ``magnitude [out_features]`` in the adapters'
    dtype, initialised to ``‖W‖`` per row as peft does, so the layer equals the base layer at
    initialisation (B = 0). ``merge()`` writes ``c⊙(W + s·B·A)`` into ``weight`` and
    ``unmerge()`` takes it out again with the norm saved at merge time.
    """

    use_dora = True

    def _setup(
        self,
        base: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        init: LoRAInit,
        freeze_base: bool,
        adapter_dtype: torch.dtype | None,
    ) -> None:
        super()._setup(base, r, lora_alpha, lora_dropout, use_rslora, init, freeze_base, adapter_dtype)
        self.magnitude = nn.Parameter(self.weight_norm().to(self.lora_A.dtype))
        # The norm the merged weight was divided by, so unmerge() inverts merge() exactly.
        self.register_buffer("_merged_norm", None, persistent=False)

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``‖W + s·B·A‖`` per output row of the unmerged weight, in float32 at least."""
        if self.merged:
            return self._merged_norm
        delta = self.delta_weight()
        return torch.linalg.vector_norm(self.weight.to(delta.dtype) + delta, dim=1)

    def _merged_weight(self, norm: Tensor) -> Tensor:
        combined = self.weight.to(norm.dtype) + self.delta_weight().to(norm.dtype)
        return (self.magnitude.to(norm.dtype) / norm)[:, None] * combined

    @torch.no_grad()
    def merge(self) -> None:
        """Writes ``c⊙(W + s·B·A)`` into ``weight``; forward then runs as a plain linear."""
        if not self.merged:
            norm = self.weight_norm()
            self.weight.copy_(self._merged_weight(norm))
            self._merged_norm = norm
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores ``W`` from the merged weight (exact up to rounding in weight's dtype)."""
        if self.merged:
            norm = self._merged_norm
            scale = norm / self.magnitude.to(norm.dtype)
            original = self.weight.to(norm.dtype) * scale[:, None] - self.delta_weight().to(norm.dtype)
            self.weight.copy_(original)
            self._merged_norm = None
            self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` whose weight is ``c⊙(W + s·B·A)``; this layer is left as it is."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.weight if self.merged else self._merged_weight(self.weight_norm()))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(input, self.weight, self.bias)
        return dora_linear(
            input,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.magnitude,
            bias=self.bias,
            scaling=self.scaling,
            dropout=self.lora_dropout,
            training=self.training,
        )
