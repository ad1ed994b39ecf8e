"""LoRALinear: a drop-in replacement for nn.Linear with a low-rank adapter."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from peftkern.functional import lora_linear

LoRAInit = Literal["kaiming", "gaussian"]


class LoRALinear(nn.Module):
    """``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with ``s = lora_alpha / r`` (``/ √r`` for rsLoRA).

    Has the attributes and forward signature of ``nn.Linear`` (``weight``, ``bias``,
    ``in_features``, ``out_features``), so it can replace one in any model. The base weight
    and bias are frozen by default; only ``lora_A [r, in]`` and ``lora_B [out, r]`` train.
    With ``init="kaiming"`` (A Kaiming-uniform, B zeros) the layer equals the base layer at
    initialisation. ``merge()`` folds the adapter into ``weight`` for inference at the cost
    of a plain linear; ``unmerge()`` takes it out again.
    """

    use_dora = False  # DoRALinear sets it; peft's adapter config field of the same name

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
        freeze_base: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup(base, r, lora_alpha, lora_dropout, use_rslora, init, freeze_base, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
        freeze_base: bool = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> LoRALinear:
        """Wraps ``linear``: its weight and bias Parameters are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"peftkern: from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear, r, lora_alpha, lora_dropout, use_rslora, init, freeze_base, adapter_dtype)
        return layer

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
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"peftkern: r (the LoRA rank) must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"peftkern: lora_dropout must be in [0, 1), got {lora_dropout}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"peftkern: init must be 'kaiming' or 'gaussian', got {init!r}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: LoRAInit = "kaiming") -> None:
        """A as Kaiming-uniform (or N(0, 1/r²) for "gaussian"), B zeros: the adapter starts at 0."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """``s·B·A`` in float32 (at least): the update ``merge()`` adds to ``weight``."""
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    def _weight_with_delta(self, sign: float) -> Tensor:
        # Added in float32 (at least) and rounded once to weight's dtype, so a merge and
        # unmerge round trip loses no more than that one rounding each way.
        delta = self.delta_weight()
        return (self.weight.to(delta.dtype) + sign * delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into ``weight``; forward then runs as a plain linear."""
        if not self.merged:
            self.weight.copy_(self._weight_with_delta(+1.0))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the adapter out of ``weight`` again (exact up to rounding in weight's dtype)."""
        if self.merged:
            self.weight.copy_(self._weight_with_delta(-1.0))
            self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` whose weight is ``W + s·B·A``; this layer is left as it is."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.weight if self.merged else self._weight_with_delta(+1.0))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(input, self.weight, self.bias)
        return lora_linear(
            input,
            self.weight,
            self.lora_A,
            self.lora_B,
            bias=self.bias,
            scaling=self.scaling,
            dropout=self.lora_dropout,
            training=self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}"
        )
