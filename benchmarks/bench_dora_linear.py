"""DoRA linear benchmark table: `python benchmarks/bench_dora_linear.py [--quick] [--csv F] [--json F]`.

CPU: fp32 M=2048, K=N=1024, r=16, dropout 0 and 0.05. GPU (when present): bf16 M=8192,
K=N=4096, r=16. Providers: the frozen nn.Linear (the floor), peftkern's LoRA and DoRA,
peft's DoRA layer, and peft's DoRA under torch.compile. Times are medians of interleaved
rounds, reported as a ratio to the frozen nn.Linear measured in the same run.
"""

from peftkern.benchmarking import dora_linear
from peftkern.benchmarking.harness import suite_main

if __name__ == "__main__":
    suite_main(dora_linear, __doc__.splitlines()[0])
