"""LoRA linear benchmark: peftkern vs the `peft` library vs eager PyTorch vs torch.compile,
against the frozen nn.Linear floor (the cost of the base layer alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkern.benchmarking.harness import Provider, Result, dtype_name, measure_case
from peftkern.nn import LoRALinear


@dataclass(frozen=True)
class LoRACase:
    rows: int
    in_features: int
    out_features: int
    r: int
    dropout: float
    dtype: torch.dtype
    device: str

    @property
    def name(self) -> str:
        dt = dtype_name(self.dtype)
        return f"lora M{self.rows} K{self.in_features} N{self.out_features} r{self.r} p{self.dropout} {dt}"


CPU_CASES = [LoRACase(2048, 1024, 1024, 16, p, torch.float32, "cpu") for p in (0.0, 0.05)]
# One q/v projection of the training-step benchmark (4×256 tokens, hidden 512): at this size the
# fixed costs around the rank-r products (threads, passes) weigh more than at the large one.
CPU_CASES.append(LoRACase(1024, 512, 512, 16, 0.05, torch.float32, "cpu"))
GPU_CASES = [LoRACase(8192, 4096, 4096, 16, p, torch.bfloat16, "cuda") for p in (0.0, 0.05)]

ALPHA_OVER_R = 2.0


class _PeftHost(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_provider(case: LoRACase, base: nn.Linear, x: torch.Tensor) -> Provider | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(
        r=case.r, lora_alpha=case.r * ALPHA_OVER_R, lora_dropout=case.dropout, target_modules=["proj"]
    )
    model = get_peft_model(_PeftHost(base), config).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return Provider("peft", lambda: model(x), list(model.parameters()), [x])


def _eager_lora(x, weight, bias, lora_A, lora_B, scaling: float, p: float):
    lora = nn.functional.linear(nn.functional.linear(nn.functional.dropout(x, p), lora_A), lora_B)
    return nn.functional.linear(x, weight, bias) + lora * scaling


def providers_for(case: LoRACase, with_compile: bool = True) -> list[Provider]:
    torch.manual_seed(0)
    device = torch.device(case.device)
    base = nn.Linear(case.in_features, case.out_features, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    x = torch.randn(case.rows, case.in_features, device=device, dtype=case.dtype, requires_grad=True)
    layer = LoRALinear.from_linear(
        base, r=case.r, lora_alpha=case.r * ALPHA_OVER_R, lora_dropout=case.dropout
    ).train()
    nn.init.normal_(layer.lora_B, std=0.02)
    # Every parameter, frozen or not, is listed so that it never counts as a saved activation.
    params = [base.weight, base.bias, layer.lora_A, layer.lora_B]

    def eager():
        return _eager_lora(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, case.dropout)

    providers = [
        Provider("frozen-linear", lambda: base(x), params, [x]),
        Provider("peftkern", lambda: layer(x), params, [x]),
        Provider("eager", eager, params, [x]),
    ]
    peft_provider = _peft_provider(case, base, x)
    if peft_provider is not None:
        providers.append(peft_provider)
    if with_compile:
        compiled = torch.compile(_eager_lora, dynamic=False)
        providers.append(
            Provider(
                "torch.compile",
                lambda: compiled(
                    x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, case.dropout
                ),
                params,
                [x],
            )
        )
    return providers


def run(cases: list[LoRACase], *, rounds: int = 15, with_compile: bool = True) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        results += measure_case(
            case.name,
            providers_for(case, with_compile),
            "frozen-linear",
            torch.device(case.device),
            rounds=rounds,
            extra={"op": "lora_linear", "dtype": str(case.dtype), "dropout": case.dropout},
        )
    return results


def default_cases() -> list[LoRACase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES


def quick_cases() -> list[LoRACase]:
    """Tiny shapes (odd sizes on purpose) that check the suite runs, in well under a second."""
    return [LoRACase(37, 40, 24, 4, 0.05, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")]
