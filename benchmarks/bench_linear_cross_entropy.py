"""Linear + cross-entropy benchmark: `python benchmarks/bench_linear_cross_entropy.py [--quick] [--json F]`.

CPU: fp32 M=4096 tokens, H=512, V=32,000, the head trained and frozen. GPU (when present):
bf16 M=16,384, H=4096, V=128,256, head frozen. Providers: eager
(F.cross_entropy(F.linear(h, W).float(), y), the floor), torch.compile of it, peftkern, and Cut
Cross-Entropy's torch_compile implementation where the package imports. Peak memory is above
the inputs: the CPU's peak RSS in a fresh process, the GPU allocator's peak.
"""

from peftkern.benchmarking import linear_cross_entropy
from peftkern.benchmarking.harness import suite_main

if __name__ == "__main__":
    suite_main(linear_cross_entropy, __doc__.splitlines()[0], rounds=5)
