"""LoRA linear under pytest-benchmark: every provider × mode of the default cases.

python -m pytest benchmarks/test_bench_lora_linear.py --benchmark-enable --benchmark-group-by=param:mode
"""

from __future__ import annotations

import pytest
import torch

from peftkern.benchmarking import lora_linear
from peftkern.benchmarking.harness import MODES, run_once

CASES = lora_linear.default_cases()
PROVIDERS = ["frozen-linear", "peftkern", "eager", "peft", "torch.compile"]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case_providers(request):
    return request.param, {p.name: p for p in lora_linear.providers_for(request.param)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_lora_linear(benchmark, case_providers, provider_name, mode):
    case, providers = case_providers
    if provider_name not in providers:
        pytest.skip(f"{provider_name} is not installed")
    provider = providers[provider_name]
    grad = torch.randn_like(provider.forward().detach())
    benchmark.extra_info.update(case=case.name, mode=mode)
    benchmark.pedantic(
        run_once, args=(provider, mode, grad, torch.device(case.device)), rounds=10, warmup_rounds=2
    )
