"""Providers × modes × metrics, measured honestly on a noisy machine.

Every provider of one case is timed in the same run, interleaved round by round, so slow
drifts of the machine hit all of them alike; each time is reported as a ratio to the floor
provider of that case. Saved-activation bytes are counted exactly with
`torch.autograd.graph.saved_tensors_hooks`, so they need no quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

MODES = ("forward", "backward", "forward+backward")


@dataclass
class Provider:
    """One implementation of a case: `forward()` returns an output with an autograd graph;
    `params` and `inputs` have their .grad cleared between runs. A parameter's storage never
    counts as a saved activation (keeping it for backward costs no extra memory); an input's
    does, since in a network it is the previous layer's output, kept alive by the saving."""

    name: str
    forward: Callable[[], Tensor]
    params: Sequence[Tensor] = ()
    inputs: Sequence[Tensor] = ()


@dataclass
class Result:
    case: str
    provider: str
    mode: str
    median_ms: float
    q10_ms: float
    q90_ms: float
    ratio_to_floor: float
    saved_bytes: int
    peak_bytes: int | None
    machine: str
    torch: str
    peftkern: str
    extra: dict = field(default_factory=dict)


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: how dtypes appear in case names."""
    return str(dtype).replace("torch.", "")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(provider: Provider) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in provider.params}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        provider.forward()
    return sum(storages.values())


def clear_grads(provider: Provider) -> None:
    for p in (*provider.params, *provider.inputs):
        p.grad = None


def run_once(provider: Provider, mode: str, grad: Tensor, device: torch.device) -> float:
    clear_grads(provider)
    if mode == "backward":
        out = provider.forward()
        _sync(device)
        start = time.perf_counter()
        out.backward(grad)
    else:
        _sync(device)
        start = time.perf_counter()
        out = provider.forward()
        if mode == "forward+backward":
            out.backward(grad)
    _sync(device)
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while `fn()` runs, above what was allocated before it;
    None off CUDA (no allocator statistics to read)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _peak_bytes(provider: Provider, grad: Tensor, device: torch.device) -> int | None:
    clear_grads(provider)
    return peak_bytes(lambda: provider.forward().backward(grad), device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], device: torch.device, *, rounds: int = 15, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn round by round (so a slow drift of the
    machine hits all alike) after `warmup` untimed rounds. For whole steps, such as a training
    step with its optimizer, that `Provider`'s forward/backward modes do not describe."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def make_result(
    case: str,
    provider: str,
    mode: str,
    times: Sequence[float],
    floor_median: float,
    device: torch.device,
    *,
    saved_bytes: int,
    peak_bytes: int | None,
    extra: dict | None = None,
) -> Result:
    """One Result row from raw times (seconds): median, 10%/90% quantiles, ratio to the floor."""
    import peftkern

    ts = sorted(times)
    median = statistics.median(ts)
    return Result(
        case=case,
        provider=provider,
        mode=mode,
        median_ms=median * 1e3,
        q10_ms=ts[len(ts) // 10] * 1e3,
        q90_ms=ts[(len(ts) * 9) // 10 - (1 if len(ts) % 10 == 0 else 0)] * 1e3,
        ratio_to_floor=median / floor_median,
        saved_bytes=saved_bytes,
        peak_bytes=peak_bytes,
        machine=machine_description(device),
        torch=torch.__version__,
        peftkern=peftkern.__version__,
        extra=dict(extra or {}),
    )


def measure_case(
    case: str,
    providers: Sequence[Provider],
    floor: str,
    device: torch.device,
    *,
    rounds: int = 15,
    warmup: int = 3,
    modes: Iterable[str] = MODES,
    extra: dict | None = None,
) -> list[Result]:
    """Times every provider in every mode, interleaved, and returns one Result per pair."""
    grad = torch.randn_like(providers[0].forward().detach())
    results: list[Result] = []
    for mode in modes:
        times: dict[str, list[float]] = {p.name: [] for p in providers}
        for _ in range(warmup):
            for p in providers:
                run_once(p, mode, grad, device)
        for _ in range(rounds):
            for p in providers:
                times[p.name].append(run_once(p, mode, grad, device))
        floor_median = statistics.median(times[floor])
        for p in providers:
            results.append(
                make_result(
                    case,
                    p.name,
                    mode,
                    times[p.name],
                    floor_median,
                    device,
                    saved_bytes=saved_activation_bytes(p),
                    peak_bytes=_peak_bytes(p, grad, device) if mode == "forward+backward" else None,
                    extra=extra,
                )
            )
    return results


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width table: one line per (case, provider, mode)."""
    header = (
        f"{'case':<34} {'provider':<14} {'mode':<17} {'median ms':>10} {'q10-q90 ms':>15} "
        f"{'x floor':>8} {'saved MiB':>10} {'peak MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'-':>9}"
        lines.append(
            f"{r.case:<34} {r.provider:<14} {r.mode:<17} {r.median_ms:10.3f} "
            f"{r.q10_ms:7.2f}-{r.q90_ms:<7.2f} {r.ratio_to_floor:8.3f} {r.saved_bytes / 2**20:10.2f} {peak}"
        )
    if results:
        lines.append(
            f"machine: {results[0].machine}; torch {results[0].torch}; peftkern {results[0].peftkern}"
        )
    return "\n".join(lines)


def invoking_command() -> str:
    """The command line that is running, as a user would type it again."""
    program = sys.argv[0]
    head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*head, *sys.argv[1:]])


def write_results(
    results: Sequence[Result], csv_path: str | None = None, json_path: str | None = None
) -> None:
    """CSV: one flat row per result. JSON: the rows plus the command and date that made them,
    which is what scripts/render_benchmark_tables.py turns into the tables of benchmarks/README.md."""
    rows = [asdict(r) for r in results]
    if json_path:
        document = {"command": invoking_command(), "date": time.strftime("%Y-%m-%d"), "results": rows}
        Path(json_path).write_text(json.dumps(document, indent=2))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            flat = [{**{k: v for k, v in row.items() if k != "extra"}, **row["extra"]} for row in rows]
            writer = csv.DictWriter(f, fieldnames=list(flat[0].keys()) if flat else [])
            writer.writeheader()
            writer.writerows(flat)


def benchmark_arguments(
    description: str, *, rounds: int, compile_flag: bool = True
) -> argparse.ArgumentParser:
    """The options every `benchmarks/bench_*.py` script takes, so that one command line (the
    GPU check's) drives them all: --rounds, --quick (tiny shapes: checks that the benchmark
    runs, measures nothing worth keeping), --no-compile where the benchmark has torch.compile
    providers, --csv and --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (default {rounds})")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that the benchmark runs")
    if compile_flag:
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--csv", help="write the results as CSV")
    parser.add_argument(
        "--json", help="write the results as JSON (benchmarks/README.md's tables are made from it)"
    )
    return parser


def suite_main(suite, description: str, *, rounds: int = 15) -> None:
    """The body of a kernel benchmark script: a suite module (see benchmarking/suites.py) run
    at its default shapes, or its quick ones with --quick; the table printed, files written."""
    args = benchmark_arguments(description, rounds=rounds).parse_args()
    cases = suite.quick_cases() if args.quick else suite.default_cases()
    results = suite.run(cases, rounds=args.rounds, with_compile=not args.no_compile)
    print(format_table(results))
    write_results(results, args.csv, args.json)
