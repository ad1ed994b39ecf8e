"""Bottleneck adapter benchmark table: `python benchmarks/bench_bottleneck_adapter.py [--csv F] [--json F]`.

CPU: fp32 M=4096, d=1024, r=64, relu. GPU (when present): bf16 M=16384, d=4096, r=64.
Times are medians of interleaved rounds, reported as a ratio to a plain copy of h with
autograd (`h * 1.0`) measured in the same run: the memory floor of any adapter.
"""

from __future__ import annotations

import argparse

from peftkern.benchmarking import bottleneck_adapter
from peftkern.benchmarking.harness import format_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--compile-modes",
        default=",".join(bottleneck_adapter.COMPILE_MODES),
        help="comma-separated torch.compile modes of the eager adapter to time ('' for none)",
    )
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = tuple(m for m in args.compile_modes.split(",") if m)
    results = bottleneck_adapter.run(
        bottleneck_adapter.default_cases(), rounds=args.rounds, compile_modes=modes
    )
    print(format_table(results))
    write_results(results, args.csv, args.json)


if __name__ == "__main__":
    main()
