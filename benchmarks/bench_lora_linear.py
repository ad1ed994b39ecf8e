"""LoRA linear benchmark table: `python benchmarks/bench_lora_linear.py [--quick] [--csv F] [--json F]`.

CPU: fp32 M=2048, K=N=1024, r=16, dropout 0 and 0.05, and the training-step benchmark's
q/v projection (M=1024, K=N=512, dropout 0.05). GPU (when present): bf16 M=8192,
K=N=4096, r=16. Times are medians of interleaved rounds, reported as a ratio to the frozen
nn.Linear measured in the same run.
"""

from peftkern.benchmarking import lora_linear
from peftkern.benchmarking.harness import suite_main

if __name__ == "__main__":
    suite_main(lora_linear, __doc__.splitlines()[0])
