"""Bottleneck adapter benchmark table: `python benchmarks/bench_bottleneck_adapter.py [--quick] [--csv F] [--json F]`.

CPU: fp32 M=4096, d=1024, r=64, relu. GPU (when present): bf16 M=16384, d=4096, r=64.
Times are medians of interleaved rounds, reported as a ratio to a plain copy of h with
autograd (`h * 1.0`) measured in the same run: the memory floor of any adapter.
"""

from peftkern.benchmarking import bottleneck_adapter
from peftkern.benchmarking.harness import suite_main

if __name__ == "__main__":
    suite_main(bottleneck_adapter, __doc__.splitlines()[0])
