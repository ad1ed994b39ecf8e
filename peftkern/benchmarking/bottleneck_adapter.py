"""Bottleneck adapter benchmark: peftkern vs eager PyTorch (`Linear → act → Linear → + h`) vs
torch.compile of it vs the `adapters` library's layer (when importable), against a plain copy
of h with autograd (`h * 1.0`: one read and one write each way, the memory floor)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkern.benchmarking.harness import Provider, Result, dtype_name, measure_case
from peftkern.nn import BottleneckAdapter
from peftkern.reference import adapter_activation


@dataclass(frozen=True)
class AdapterCase:
    rows: int
    hidden: int
    bottleneck: int
    activation: str
    dtype: torch.dtype
    device: str

    @property
    def name(self) -> str:
        dt = dtype_name(self.dtype)
        return f"adapter M{self.rows} d{self.hidden} r{self.bottleneck} {self.activation} {dt}"


CPU_CASES = [AdapterCase(4096, 1024, 64, "relu", torch.float32, "cpu")]
GPU_CASES = [AdapterCase(16384, 4096, 64, "relu", torch.bfloat16, "cuda")]

# torch.compile modes of the eager adapter. On a GPU max-autotune tunes Triton GEMMs for
# minutes, so only the default mode is timed there.
CPU_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
GPU_COMPILE_MODES = ("default",)


class EagerAdapter(nn.Module):
    """The textbook adapter: ``h + up(act(down(h)))`` with two nn.Linear layers."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.activation = adapter.activation
        self.down = nn.Linear(
            adapter.hidden_size, adapter.bottleneck, device=adapter.w_down.device, dtype=adapter.w_down.dtype
        )
        self.up = nn.Linear(
            adapter.bottleneck, adapter.hidden_size, device=adapter.w_up.device, dtype=adapter.w_up.dtype
        )
        with torch.no_grad():  # the same weights as the peftkern adapter
            self.down.weight.copy_(adapter.w_down)
            self.down.bias.copy_(adapter.b_down)
            self.up.weight.copy_(adapter.w_up)
            self.up.bias.copy_(adapter.b_up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(adapter_activation(self.down(h), self.activation))


def _adapters_library_provider(case: AdapterCase, h: torch.Tensor) -> Provider | None:
    try:
        from adapters import SeqBnConfig
        from adapters.methods.modeling import Adapter
    except ImportError:
        return None
    config = SeqBnConfig(reduction_factor=case.hidden / case.bottleneck, non_linearity=case.activation)
    layer = (
        Adapter("bench", case.hidden, case.bottleneck, config)
        .to(device=case.device, dtype=case.dtype)
        .train()
    )
    return Provider("adapters", lambda: layer(h, h)[0], list(layer.parameters()), [h])


def providers_for(case: AdapterCase, with_compile: bool = True) -> list[Provider]:
    torch.manual_seed(0)
    device = torch.device(case.device)
    h = torch.randn(case.rows, case.hidden, device=device, dtype=case.dtype, requires_grad=True)
    adapter = BottleneckAdapter(
        case.hidden, bottleneck=case.bottleneck, activation=case.activation, device=device, dtype=case.dtype
    )
    nn.init.normal_(adapter.b_down, std=0.02)  # some pre-activations of either sign
    eager = EagerAdapter(adapter)
    providers = [
        Provider("copy", lambda: h * 1.0, [], [h]),
        Provider("peftkern", lambda: adapter(h), list(adapter.parameters()), [h]),
        Provider("eager", lambda: eager(h), list(eager.parameters()), [h]),
    ]
    compile_modes = CPU_COMPILE_MODES if device.type == "cpu" else GPU_COMPILE_MODES
    for mode in compile_modes if with_compile else ():
        compiled = torch.compile(eager, mode=mode, dynamic=False)
        label = "compile" if mode == "default" else f"compile:{mode.replace('-no-cudagraphs', '')}"
        providers.append(
            Provider(label, lambda compiled=compiled: compiled(h), list(eager.parameters()), [h])
        )
    library = _adapters_library_provider(case, h)
    if library is not None:
        providers.append(library)
    return providers


def run(cases: list[AdapterCase], *, rounds: int = 15, with_compile: bool = True) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        results += measure_case(
            case.name,
            providers_for(case, with_compile),
            "copy",
            torch.device(case.device),
            rounds=rounds,
            extra={"op": "bottleneck_adapter", "dtype": str(case.dtype), "activation": case.activation},
        )
    return results


def default_cases() -> list[AdapterCase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES


def quick_cases() -> list[AdapterCase]:
    """Tiny shapes (odd sizes on purpose) that check the suite runs, in well under a second."""
    return [AdapterCase(37, 40, 6, "relu", torch.float32, "cuda" if torch.cuda.is_available() else "cpu")]
