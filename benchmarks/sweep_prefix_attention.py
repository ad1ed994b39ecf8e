"""Prefix attention over a range of shapes: `python benchmarks/sweep_prefix_attention.py`.

Forward+backward of peftkern's prefix attention against SDPA over the sequence alone (the
floor, with grouped-query attention where the shape has it), each the best of three medians,
q/k/v in the [B, n, H, d] memory projections produce. A check that the kernel holds up away
from the benchmark's shape (long sequences, GQA, no causal rule, short sequences), not a
table for the README: it prints, it writes nothing.
"""

from __future__ import annotations

import time

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

import peftkern

# batch, query heads, key/value heads, sequence, prefix rows, head dim, causal
SHAPES = [
    (4, 8, 8, 512, 16, 64, True),
    (2, 12, 12, 512, 20, 64, False),
    (8, 8, 8, 128, 16, 64, True),
    (1, 32, 8, 2048, 20, 128, True),
    (1, 8, 8, 4096, 16, 64, True),
]


def median_ms(step, reps: int) -> float:
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    for B, Hq, Hkv, n, m, d, causal in SHAPES:

        def leaf(*shape: int) -> torch.Tensor:
            return torch.randn(*shape).requires_grad_(True)

        q_mem, k_mem, v_mem = leaf(B, n, Hq, d), leaf(B, n, Hkv, d), leaf(B, n, Hkv, d)
        prefix_k, prefix_v = leaf(Hkv, m, d), leaf(Hkv, m, d)
        grad = torch.randn(B, n, Hq, d).transpose(1, 2)

        def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return q_mem.transpose(1, 2), k_mem.transpose(1, 2), v_mem.transpose(1, 2)

        def floor() -> None:
            sdpa(*qkv(), is_causal=causal, enable_gqa=Hq != Hkv).backward(grad)

        def prefix() -> None:
            peftkern.prefix_attention(*qkv(), prefix_k, prefix_v, causal=causal).backward(grad)

        reps = max(3, min(30, int(5e8 / (B * Hq * n * n * d))))
        floor_ms = min(median_ms(floor, reps) for _ in range(3))
        prefix_ms = min(median_ms(prefix, reps) for _ in range(3))
        print(
            f"B{B} H{Hq}/{Hkv} n{n} m{m} d{d} {'causal' if causal else 'non-causal'}: "
            f"no prefix (SDPA) {floor_ms:.1f} ms, peftkern {prefix_ms:.1f} ms, x floor {prefix_ms / floor_ms:.3f}"
        )


if __name__ == "__main__":
    main()
