"""Linear + cross-entropy benchmark: peftkern vs the eager expression
(``F.cross_entropy(F.linear(h, W).float(), y)``) vs its torch.compile vs Cut Cross-Entropy's
``torch_compile`` implementation (when the ``cut-cross-entropy`` package is importable), with
eager as the floor.

Peak memory is what forward + backward adds above the inputs: on a GPU the allocator's peak
(``torch.cuda.max_memory_allocated``); on the CPU, which has no allocator statistics, the
peak resident set size of a fresh process (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after the inputs exist and a first untimed step has run, with
glibc's malloc returning every large block to the system so that freed memory is not counted
as resident).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from peftkern.benchmarking.harness import Provider, Result, dtype_name, measure_case
from peftkern.functional import linear_cross_entropy

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossCase:
    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: str
    train_head: bool  # full fine-tuning trains the head; LoRA freezes it

    @property
    def name(self) -> str:
        head = "head trained" if self.train_head else "head frozen"
        return f"lce M{self.rows} H{self.hidden} V{self.vocab} {dtype_name(self.dtype)} {head}"


# The CPU target shape, with the head trained (the larger case: dW too) and frozen.
CPU_CASES = [LossCase(4096, 512, 32_000, torch.float32, "cpu", train) for train in (True, False)]
# A Llama-3 vocabulary on a GPU, LoRA-style (frozen head).
GPU_CASES = [LossCase(16_384, 4096, 128_256, torch.bfloat16, "cuda", False)]


def eager_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX
    )


def cut_cross_entropy_loss() -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """Cut Cross-Entropy's torch_compile implementation, or None where the package is absent.

    Its package __init__ imports Triton (absent on CPU-only machines), so the module is loaded
    from the package directory without running that __init__."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("cut_cross_entropy")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "cut_cross_entropy" not in sys.modules:
        package = types.ModuleType("cut_cross_entropy")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["cut_cross_entropy"] = package
    try:
        from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy
    except ImportError:
        return None
    return lambda h, w, y: torch_compile_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX)


def make_inputs(case: LossCase) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.rows, case.hidden, generator=g).to(case.device, case.dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=g) * case.hidden**-0.5).to(
        case.device, case.dtype
    )
    labels = torch.randint(0, case.vocab, (case.rows,), generator=g)
    labels[: case.rows // 8] = IGNORE_INDEX  # a prompt that does not count, as in SFT
    return hidden.requires_grad_(), weight.requires_grad_(case.train_head), labels.to(case.device)


def loss_functions(with_compile: bool = True) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    fns: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "eager": eager_loss,
        "peftkern": lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX),
    }
    if with_compile:
        fns["torch.compile"] = torch.compile(eager_loss, dynamic=False)
        cce = cut_cross_entropy_loss()
        if cce is not None:
            fns["cut-cross-entropy"] = cce
    return fns


def peak_rss_above_inputs(case: LossCase, provider: str) -> int:
    """Peak resident bytes one forward + backward adds above its inputs, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    case_json = json.dumps({**asdict(case), "dtype": dtype_name(case.dtype)})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkern.benchmarking.linear_cross_entropy",
            "--peak-rss",
            provider,
            case_json,
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_peak_rss_here(case: LossCase, provider: str) -> int:
    hidden, weight, labels = make_inputs(case)
    fn = loss_functions()[provider]
    fn(hidden, weight, labels).backward()  # compiles, and allocates the .grad tensors
    hidden.grad = weight.grad = None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    base = _status_bytes("VmRSS")
    fn(hidden, weight, labels).backward()
    return _status_bytes("VmHWM") - base


def run(
    cases: list[LossCase], *, rounds: int = 5, with_compile: bool = True, peak_rss: bool = True
) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        hidden, weight, labels = make_inputs(case)
        fns = loss_functions(with_compile)
        providers = [
            Provider(name, lambda fn=fn: fn(hidden, weight, labels), [weight], [hidden])
            for name, fn in fns.items()
        ]
        case_results = measure_case(
            case.name,
            providers,
            "eager",
            torch.device(case.device),
            rounds=rounds,
            warmup=1,
            modes=("forward", "forward+backward"),
            extra={"op": "linear_cross_entropy", "dtype": str(case.dtype), "peak": "cuda allocator"},
        )
        if case.device == "cpu" and peak_rss:
            peaks = {name: peak_rss_above_inputs(case, name) for name in fns}
            for r in case_results:
                if r.mode == "forward+backward":
                    r.peak_bytes = peaks[r.provider]
                    r.extra["peak"] = "rss above inputs, fresh process"
        results += case_results
    return results


def default_cases() -> list[LossCase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES


def quick_cases() -> list[LossCase]:
    """Tiny shapes (odd sizes on purpose) that check the suite runs."""
    return [LossCase(37, 24, 301, torch.float32, "cuda" if torch.cuda.is_available() else "cpu", True)]


def _main() -> None:
    parser = argparse.ArgumentParser(description="one peak-RSS measurement (run by peak_rss_above_inputs)")
    parser.add_argument("--peak-rss", required=True, metavar="PROVIDER")
    parser.add_argument("case", help="the LossCase as JSON")
    args = parser.parse_args()
    fields = json.loads(args.case)
    fields["dtype"] = getattr(torch, fields["dtype"])
    print(_measure_peak_rss_here(LossCase(**fields), args.peak_rss))


if __name__ == "__main__":
    import peftkern  # noqa: F401  (loads the ops)

    _main()
