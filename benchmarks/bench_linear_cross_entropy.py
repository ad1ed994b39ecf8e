"""Linear + cross-entropy benchmark table: `python benchmarks/bench_linear_cross_entropy.py [--csv F] [--json F]`.

CPU: fp32 M=4096 tokens, H=512, V=32,000, the head trained and frozen. GPU (when present):
bf16 M=16,384, H=4096, V=128,256, head frozen. Providers: eager
(F.cross_entropy(F.linear(h, W).float(), y), the floor), torch.compile of it, peftkern, and Cut
Cross-Entropy's torch_compile implementation where the package imports. Peak memory is above
the inputs: the CPU's peak RSS in a fresh process, the GPU allocator's peak.
"""

from __future__ import annotations

import argparse

from peftkern.benchmarking import linear_cross_entropy
from peftkern.benchmarking.harness import format_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile and Cut Cross-Entropy")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that it runs")
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = linear_cross_entropy.quick_cases() if args.quick else linear_cross_entropy.default_cases()
    results = linear_cross_entropy.run(cases, rounds=args.rounds, with_compile=not args.no_compile)
    print(format_table(results))
    for r in results:
        if r.mode == "forward+backward" and r.peak_bytes is not None:
            print(f"{r.case} {r.provider}: peak {r.peak_bytes / 2**20:.0f} MiB above the inputs")
    write_results(results, args.csv, args.json)


if __name__ == "__main__":
    main()
