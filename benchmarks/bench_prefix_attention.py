"""Prefix attention benchmark table: `python benchmarks/bench_prefix_attention.py [--csv F] [--json F]`.

CPU: fp32 B=4, H=8, n=512, m=16, d=64, causal (a decoder), and B=2, H=12, n=512, m=20, d=64
not causal (a BERT-base-sized encoder). GPU (when present): bf16 B=8, H=32, n=2048,
m=20, d=128. Providers: `no-prefix` (SDPA over the sequence alone, the floor), `concat+sdpa`
(concatenated prefix, with an explicit mask when causal) and `peftkern`. Times are medians of interleaved
rounds, reported as a ratio to the floor measured in the same run.
"""

from __future__ import annotations

import argparse

from peftkern.benchmarking import prefix_attention
from peftkern.benchmarking.harness import format_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = prefix_attention.run(prefix_attention.default_cases(), rounds=args.rounds)
    print(format_table(results))
    write_results(results, args.csv, args.json)


if __name__ == "__main__":
    main()
