"""DoRA linear benchmark table: `python benchmarks/bench_dora_linear.py [--csv F] [--json F]`.

CPU: fp32 M=2048, K=N=1024, r=16, dropout 0 and 0.05. GPU (when present): bf16 M=8192,
K=N=4096, r=16. Providers: the frozen nn.Linear (the floor), peftkern's LoRA and DoRA,
peft's DoRA layer, and peft's DoRA under torch.compile. Times are medians of interleaved
rounds, reported as a ratio to the frozen nn.Linear measured in the same run.
"""

from __future__ import annotations

import argparse

from peftkern.benchmarking import dora_linear
from peftkern.benchmarking.harness import format_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = dora_linear.run(
        dora_linear.default_cases(), rounds=args.rounds, with_compile=not args.no_compile
    )
    print(format_table(results))
    write_results(results, args.csv, args.json)


if __name__ == "__main__":
    main()
