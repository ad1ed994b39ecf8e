"""BottleneckAdapter, the Houlsby / Pfeiffer layouts, and trainable-parameter counting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from peftkern.functional import ADAPTER_ACTIVATIONS, bottleneck_adapter

AdapterInit = Literal["bert", "houlsby", "zeros_up"]
AdapterPosition = Literal["attention_output", "ffn_output"]


class BottleneckAdapter(nn.Module):
    """``out = residual + s·(W_up·act(W_down·h + b_down) + b_up)``, with ``residual = h`` by default.

    The bottleneck is ``bottleneck`` or ``hidden_size // reduction_factor``. ``s`` is the float
    ``scaling``, or with ``learned_scaling`` a trainable per-channel vector ``[hidden_size]``
    initialised to ``scaling``. Initialisations: ``"bert"`` N(0, 0.02) weights (the
    ``adapters`` library default), ``"houlsby"`` N(0, 0.01) truncated at two standard
    deviations (near-identity, as in Houlsby et al. 2019), ``"zeros_up"`` Kaiming-uniform down
    and zero up projection (exactly the identity at initialisation). Biases start at zero.

    ``dropout`` applies to the adapter branch's input only (``h`` enters the bottleneck dropped,
    the residual is not); it costs one unfused dropout of ``h`` in training.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int | None = None,
        reduction_factor: float = 16,
        activation: str = "relu",
        scaling: float = 1.0,
        init: AdapterInit = "bert",
        dropout: float = 0.0,
        learned_scaling: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bottleneck is None:
            bottleneck = int(hidden_size // reduction_factor)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"peftkern: hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(bottleneck, int) or bottleneck <= 0:
            raise ValueError(
                "peftkern: bottleneck must be a positive int (or hidden_size // reduction_factor >= 1), "
                f"got {bottleneck!r}"
            )
        if init not in ("bert", "houlsby", "zeros_up"):
            raise ValueError(f"peftkern: init must be 'bert', 'houlsby' or 'zeros_up', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"peftkern: dropout must be in [0, 1), got {dropout}")
        if activation not in (*ADAPTER_ACTIVATIONS, "swish"):
            raise ValueError(
                f"peftkern: activation must be one of {ADAPTER_ACTIVATIONS} (or 'swish'), got {activation!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.bottleneck = bottleneck
        self.activation = activation
        self.dropout = dropout
        self.w_down = nn.Parameter(torch.empty(bottleneck, hidden_size, **factory))
        self.w_up = nn.Parameter(torch.empty(hidden_size, bottleneck, **factory))
        self.b_down = nn.Parameter(torch.empty(bottleneck, **factory)) if bias else None
        self.b_up = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        if learned_scaling:
            self.scaling: float | nn.Parameter = nn.Parameter(
                torch.full((hidden_size,), float(scaling), **factory)
            )
        else:
            self.scaling = float(scaling)
        self.init = init
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: AdapterInit = "bert") -> None:
        if init == "bert":
            nn.init.normal_(self.w_down, std=0.02)
            nn.init.normal_(self.w_up, std=0.02)
        elif init == "houlsby":
            for w in (self.w_down, self.w_up):
                nn.init.trunc_normal_(w, std=0.01, a=-0.02, b=0.02)
        else:
            nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
            nn.init.zeros_(self.w_up)
        for b in (self.b_down, self.b_up):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, h: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual`` defaults to ``h``; pass the transformer's own residual to fuse its addition."""
        if self.dropout > 0.0 and self.training:
            residual = h if residual is None else residual
            h = nn.functional.dropout(h, self.dropout)
        return bottleneck_adapter(
            h,
            self.w_down,
            self.b_down,
            self.w_up,
            self.b_up,
            activation=self.activation,
            scaling=self.scaling,
            residual=residual,
        )

    def extra_repr(self) -> str:
        learned = isinstance(self.scaling, nn.Parameter)
        scaling = "learned" if learned else self.scaling
        return (
            f"hidden_size={self.hidden_size}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
            f"scaling={scaling}, bias={self.b_up is not None}, dropout={self.dropout}"
        )


@dataclass(frozen=True)
class AdapterConfig:
    """Where adapters sit in each transformer layer and what they look like.

    With ``x`` the sublayer's input and ``y`` its output (after its dropout, before the
    transformer's residual and layer norm), the two published layouts are:

    * **Houlsby** (Houlsby et al. 2019): after the attention output *and* after the FFN, swish.
      ``out = LN(x + y + A(y))``: the adapter reads ``y`` and its own residual is ``y``; the
      original residual and layer norm follow. Fused: ``LN(adapter(y, residual=x + y))``.
    * **Pfeiffer** (Pfeiffer et al. 2021): after the FFN only, relu. The original residual and
      layer norm come first, the adapter reads ``LN(x + y)``, its residual is ``y`` (taken
      before the layer norm), and the same layer norm is applied again:
      ``out = LN(x + y + A(LN(x + y)))``. Fused: ``LN(adapter(LN(x + y), residual=x + y))``.

    Here ``A(h) = W_up·act(W_down·h + b_down) + b_up``, the adapter branch without its residual.
    """

    positions: tuple[AdapterPosition, ...]
    activation: str
    reduction_factor: float = 16
    init: AdapterInit = "bert"

    @classmethod
    def houlsby(cls, reduction_factor: float = 16) -> AdapterConfig:
        return cls(("attention_output", "ffn_output"), "silu", reduction_factor)

    @classmethod
    def pfeiffer(cls, reduction_factor: float = 16) -> AdapterConfig:
        return cls(("ffn_output",), "relu", reduction_factor)

    def build_layer(self, hidden_size: int, **kwargs: object) -> nn.ModuleDict:
        """The adapters of one transformer layer, keyed by position."""
        return nn.ModuleDict(
            {
                position: BottleneckAdapter(
                    hidden_size,
                    reduction_factor=self.reduction_factor,
                    activation=self.activation,
                    init=self.init,
                    **kwargs,
                )
                for position in self.positions
            }
        )

    def build(self, hidden_size: int, num_layers: int, **kwargs: object) -> nn.ModuleList:
        """The adapters of a whole model: one ``build_layer`` per transformer layer."""
        return nn.ModuleList(self.build_layer(hidden_size, **kwargs) for _ in range(num_layers))


HOULSBY = AdapterConfig.houlsby()
PFEIFFER = AdapterConfig.pfeiffer()


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_trainable(model: nn.Module) -> str:
    """``trainable params: 894,528 || all params: ... || trainable%: ...``, ready to print."""
    trainable, total = count_trainable(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
