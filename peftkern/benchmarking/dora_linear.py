"""DoRA linear benchmark: peftkern's DoRA vs the `peft` library's DoRA layer (eager and under
torch.compile), with peftkern's LoRA for reference, against the frozen nn.Linear floor."""

from __future__ import annotations

import torch
from torch import nn

from peftkern.benchmarking.harness import Provider, Result, measure_case
from peftkern.benchmarking.lora_linear import ALPHA_OVER_R, LoRACase, _PeftHost
from peftkern.benchmarking.lora_linear import quick_cases as quick_cases  # the same tiny shapes
from peftkern.nn import DoRALinear, LoRALinear

CPU_CASES = [LoRACase(2048, 1024, 1024, 16, p, torch.float32, "cpu") for p in (0.0, 0.05)]
GPU_CASES = [LoRACase(8192, 4096, 4096, 16, p, torch.bfloat16, "cuda") for p in (0.0, 0.05)]


def _peft_dora(case: LoRACase, base: nn.Linear) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(
        r=case.r,
        lora_alpha=case.r * ALPHA_OVER_R,
        lora_dropout=case.dropout,
        target_modules=["proj"],
        use_dora=True,
    )
    model = get_peft_model(_PeftHost(base), config).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model


def providers_for(case: LoRACase, with_compile: bool = True) -> list[Provider]:
    torch.manual_seed(0)
    device = torch.device(case.device)
    base = nn.Linear(case.in_features, case.out_features, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    x = torch.randn(case.rows, case.in_features, device=device, dtype=case.dtype, requires_grad=True)
    options = {"r": case.r, "lora_alpha": case.r * ALPHA_OVER_R, "lora_dropout": case.dropout}
    lora = LoRALinear.from_linear(base, **options).train()
    dora = DoRALinear.from_linear(base, **options).train()
    for layer in (lora, dora):
        nn.init.normal_(layer.lora_B, std=0.02)
    # Every parameter, frozen or not, is listed so that it never counts as a saved activation.
    params = [base.weight, base.bias, lora.lora_A, lora.lora_B, dora.lora_A, dora.lora_B, dora.magnitude]
    providers = [
        Provider("frozen-linear", lambda: base(x), params, [x]),
        Provider("peftkern-lora", lambda: lora(x), params, [x]),
        Provider("peftkern-dora", lambda: dora(x), params, [x]),
    ]
    peft_model = _peft_dora(case, base)
    if peft_model is not None:
        peft_params = params + list(peft_model.parameters())
        providers.append(Provider("peft-dora", lambda: peft_model(x), peft_params, [x]))
        if with_compile:
            compiled = torch.compile(peft_model, dynamic=False)
            providers.append(Provider("peft-dora+torch.compile", lambda: compiled(x), peft_params, [x]))
    return providers


def run(cases: list[LoRACase], *, rounds: int = 15, with_compile: bool = True) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        results += measure_case(
            case.name.replace("lora", "dora", 1),
            providers_for(case, with_compile),
            "frozen-linear",
            torch.device(case.device),
            rounds=rounds,
            extra={"op": "dora_linear", "dtype": str(case.dtype), "dropout": case.dropout},
        )
    return results


def default_cases() -> list[LoRACase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES
