"""Prefix attention benchmark: peftkern vs concatenation + SDPA with an explicit mask (eager and
under torch.compile), against attention over the sequence alone (the floor: what the layer
costs without any prefix)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

import peftkern
from peftkern.benchmarking.harness import Provider, Result, dtype_name, measure_case


@dataclass(frozen=True)
class PrefixCase:
    batch: int
    heads: int
    seq: int
    prefix: int
    head_dim: int
    dtype: torch.dtype
    device: str
    causal: bool = True

    @property
    def name(self) -> str:
        dt = dtype_name(self.dtype)
        kind = "" if self.causal else " non-causal"
        return f"prefix B{self.batch} H{self.heads} n{self.seq} m{self.prefix} d{self.head_dim}{kind} {dt}"


CPU_CASES = [
    PrefixCase(4, 8, 512, 16, 64, torch.float32, "cpu"),  # decoder (causal), the shape
    PrefixCase(2, 12, 512, 20, 64, torch.float32, "cpu", causal=False),  # BERT-base-like encoder
]
GPU_CASES = [PrefixCase(8, 32, 2048, 20, 128, torch.bfloat16, "cuda")]


def providers_for(case: PrefixCase, with_compile: bool = True) -> list[Provider]:
    torch.manual_seed(0)
    B, H, n, m, d = case.batch, case.heads, case.seq, case.prefix, case.head_dim

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=case.device, dtype=case.dtype).requires_grad_(True)

    # q, k and v as attention layers get them: projections' [B, n, H, d] memory seen as
    # [B, H, n, d] (a transposed view, taken inside each forward so it is part of the graph).
    q_mem, k_mem, v_mem = leaf(B, n, H, d), leaf(B, n, H, d), leaf(B, n, H, d)

    def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return q_mem.transpose(1, 2), k_mem.transpose(1, 2), v_mem.transpose(1, 2)

    prefix_k, prefix_v = leaf(H, m, d), leaf(H, m, d)
    # The concatenation baseline's mask [n, m + n] when causal: every query sees the prefix,
    # and the sequence causally. Built once, outside the timed region (in its favour); without
    # the causal rule every query sees every key and no mask is needed.
    keep = None
    if case.causal:
        keep = torch.ones(n, m + n, dtype=torch.bool, device=case.device)
        keep[:, m:] = torch.ones(n, n, dtype=torch.bool, device=case.device).tril()

    def concat_sdpa() -> torch.Tensor:
        q, k, v = qkv()
        k_ext = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
        v_ext = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
        return sdpa(q, k_ext, v_ext, attn_mask=keep)

    # The prefix rows are parameters; q, k and v are activations of the layer before.
    prefix, inputs = [prefix_k, prefix_v], [q_mem, k_mem, v_mem]
    providers = [
        Provider("no-prefix", lambda: sdpa(*qkv(), is_causal=case.causal), [], inputs),
        Provider("concat+sdpa", concat_sdpa, prefix, inputs),
        Provider(
            "peftkern",
            lambda: peftkern.prefix_attention(*qkv(), prefix_k, prefix_v, causal=case.causal),
            prefix,
            inputs,
        ),
    ]
    if with_compile:
        compiled = torch.compile(concat_sdpa, dynamic=False)
        providers.append(Provider("torch.compile", compiled, prefix, inputs))
    return providers


def run(cases: list[PrefixCase], *, rounds: int = 15, with_compile: bool = True) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        results += measure_case(
            case.name,
            providers_for(case, with_compile),
            "no-prefix",
            torch.device(case.device),
            rounds=rounds,
            extra={"op": "prefix_attention", "dtype": str(case.dtype), "causal": case.causal},
        )
    return results


def default_cases() -> list[PrefixCase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES


def quick_cases() -> list[PrefixCase]:
    """Tiny shapes (odd sizes on purpose) that check the suite runs, in well under a second."""
    return [PrefixCase(2, 3, 17, 5, 8, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")]
