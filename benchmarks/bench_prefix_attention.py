"""Prefix attention benchmark table: `python benchmarks/bench_prefix_attention.py [--quick] [--csv F] [--json F]`.

CPU: fp32 B=4, H=8, n=512, m=16, d=64, causal (a decoder), and B=2, H=12, n=512, m=20, d=64
not causal (a BERT-base-sized encoder). GPU (when present): bf16 B=8, H=32, n=2048,
m=20, d=128. Providers: `no-prefix` (SDPA over the sequence alone, the floor), `concat+sdpa`
(concatenated prefix, with an explicit mask when causal) and `peftkern`. Times are medians of interleaved
rounds, reported as a ratio to the floor measured in the same run.
"""

from peftkern.benchmarking import prefix_attention
from peftkern.benchmarking.harness import suite_main

if __name__ == "__main__":
    suite_main(prefix_attention, __doc__.splitlines()[0])
