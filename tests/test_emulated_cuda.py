"""Every CUDA kernel of csrc/cuda/kernels/ run on the CPU through the emulation (csrc/emulation/),
one test per __global__ kernel, named after it, against the same references as the CPU ops.

Shapes cover row and column tails, several blocks in every grid dimension, the largest rank
tile and ranks past it, the grid-stride loops and the dropout path. Outputs start as NaN, so an
element that a launch geometry misses fails the comparison. Kernels whose threads exchange data
through shared memory run with the warps in both orders (see set_reverse_warp_order), so a
missing barrier reads a NaN whichever warp writes first. Where the kernel's arithmetic order is
one a few PyTorch ops can replay (no reduction across threads), the comparison is bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_low_precision
from emulated_cuda import emulated_kernels

from peftkern import reference
from peftkern.functional import ADAPTER_ACTIVATIONS

pytestmark = pytest.mark.emulated_cuda

SEED = 1234


@pytest.fixture(scope="module")
def kernels():
    return emulated_kernels()


@pytest.fixture(params=["forward", "reverse"])
def warp_order(request, kernels):
    kernels.set_reverse_warp_order(request.param == "reverse")
    yield request.param
    kernels.set_reverse_warp_order(False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def multipliers(rows: int, cols: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' dropout multiplier per element: float(1 / (1 - p)) or 0, in dtype."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=dtype)
    keep = reference.dropout_keep(rows, cols, SEED, p)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype)
    return torch.where(keep, scale, torch.zeros((), dtype=dtype))


def seed_tensor() -> torch.Tensor:
    return torch.tensor([SEED], dtype=torch.int64)


# (x dtype, adapter dtype) pairs the CUDA LoRA op accepts.
LORA_TYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
LORA_TYPE_IDS = ["f32", "f64", "f16", "bf16-f32"]
# (M, K, r): a single row and rank; row, column and rank tails over several blocks; exactly the
# largest rank tile (16) with more column groups than threads (K > 4·128).
LORA_SHAPES = [(1, 3, 1), (9, 517, 40), (6, 1030, 16)]


def lora_inputs(M: int, K: int, r: int, x_type: torch.dtype, a_type: torch.dtype):
    g = torch.Generator().manual_seed(M * 1000 + K + r)
    x = torch.randn(M, K, generator=g).to(x_type)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(a_type)
    dS = torch.randn(M, r, generator=g).to(a_type)
    return x, A, dS


@pytest.mark.parametrize("types", LORA_TYPES, ids=LORA_TYPE_IDS)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_down_project_kernel(kernels, warp_order, types, shape, p):
    M, K, r = shape
    x_type, a_type = types
    x, A, _ = lora_inputs(M, K, r, x_type, a_type)
    S = kernels.down_project_kernel(x, A, p, seed_tensor())
    assert S.dtype == a_type and not S.isnan().any()
    truth = (x.double() * multipliers(M, K, p, torch.float64)) @ A.double().T
    plain = (x.to(a_type) * multipliers(M, K, p, a_type)) @ A.T
    assert_close_low_precision(S, plain, truth, "S")


@pytest.mark.parametrize("types", LORA_TYPES, ids=LORA_TYPE_IDS)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_dx_kernel(kernels, warp_order, types, shape, p):
    M, K, r = shape
    x_type, a_type = types
    x, A, dS = lora_inputs(M, K, r, x_type, a_type)
    dx = kernels.lora_dx_kernel(x, A, dS, p, seed_tensor())
    # dx[m, k] = mult·Σ_j dS[m, j]·A[j, k], summed over j in order in the compute type.
    C = compute_dtype(a_type)
    acc = torch.zeros(M, K, dtype=C)
    for j in range(r):
        acc = acc + dS[:, j : j + 1].to(C) * A[j].to(C)[None, :]
    expected = (multipliers(M, K, p, C) * acc).to(x_type)
    torch.testing.assert_close(dx, expected, rtol=0, atol=0)


@pytest.mark.parametrize("types", LORA_TYPES, ids=LORA_TYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 3, 1), (130, 517, 40), (200, 1030, 16)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_dA_kernel(kernels, types, shape, p):
    M, K, r = shape
    x_type, a_type = types
    x, _, dS = lora_inputs(M, K, r, x_type, a_type)
    # One multiprocessor: splits = min(4·1 / blocks, M / 64), several for the larger M.
    partial = kernels.lora_dA_kernel(x, dS, p, seed_tensor(), 1)
    splits = partial.shape[0]
    assert splits == max(1, min(math.ceil(4 / (math.ceil(K / 512) * math.ceil(r / 16))), math.ceil(M / 64)))
    # partial[s, j, k] = Σ_{m in split s} dS[m, j]·drop(x)[m, k], summed over m in order.
    C = compute_dtype(a_type)
    xm = x.to(C) * multipliers(M, K, p, C)
    rows_per_split = math.ceil(M / splits)
    expected = torch.zeros(splits, r, K, dtype=C)
    for m in range(M):
        s = m // rows_per_split
        expected[s] = expected[s] + dS[m].to(C)[:, None] * xm[m][None, :]
    torch.testing.assert_close(partial, expected, rtol=0, atol=0)


ADAPTER_TYPES = [torch.float32, torch.float64, torch.bfloat16]


def adapter_inputs(rows: int, r: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(rows + r)
    return torch.randn(rows, r, generator=g).to(dtype), torch.randn(rows, r, generator=g).to(dtype)


# 130 x 25 elements on one multiprocessor: 8 blocks of 256 threads, each looping twice.
@pytest.mark.parametrize("dtype", ADAPTER_TYPES, ids=str)
@pytest.mark.parametrize("activation", ADAPTER_ACTIVATIONS)
@pytest.mark.parametrize("with_scale_column", [False, True])
def test_activate_kernel(kernels, dtype, activation, with_scale_column):
    rows, r, scale = 130, 24, 0.75
    Z, _ = adapter_inputs(rows, r, dtype)
    width = r + 1 if with_scale_column else r
    a = kernels.activate_kernel(Z, activation, scale, width, 1)
    assert a.shape == (rows, width) and not a.isnan().any()
    truth = scale * reference.adapter_activation(Z.double(), activation)
    plain = scale * reference.adapter_activation(Z, activation)
    assert_close_low_precision(a[:, :r], plain, truth, "a")
    if activation in ("relu", "identity"):  # exact arithmetic: bit for bit
        C = compute_dtype(dtype)
        expected = (torch.tensor(scale, dtype=C) * reference.adapter_activation(Z.to(C), activation)).to(
            dtype
        )
        torch.testing.assert_close(a[:, :r], expected, rtol=0, atol=0)
    if with_scale_column:
        assert (a[:, r] == torch.tensor(scale, dtype=dtype)).all()


@pytest.mark.parametrize("dtype", ADAPTER_TYPES, ids=str)
@pytest.mark.parametrize("activation", ADAPTER_ACTIVATIONS)
@pytest.mark.parametrize("width", ["none", "r", "r+1"])
def test_activate_backward_kernel(kernels, dtype, activation, width):
    rows, r, scale = 130, 24, 0.75
    Z, dA = adapter_inputs(rows, r, dtype)
    a_width = {"none": 0, "r": r, "r+1": r + 1}[width]
    dA_out, a = kernels.activate_backward_kernel(Z, dA, activation, scale, a_width, 1)

    def scaled_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_()
        (d,) = torch.autograd.grad(reference.adapter_activation(z, activation).sum(), z)
        return scale * g * d

    assert not dA_out.isnan().any()
    truth = scaled_grad(Z.double(), dA.double())
    assert_close_low_precision(dA_out, scaled_grad(Z, dA), truth, "dA")
    if a_width:
        truth_a = scale * reference.adapter_activation(Z.double(), activation)
        assert_close_low_precision(
            a[:, :r], scale * reference.adapter_activation(Z, activation), truth_a, "a"
        )
        if a_width == r + 1:
            assert (a[:, r] == torch.tensor(scale, dtype=dtype)).all()


# Blocks of score rows as blockwise_attention cuts them: (causal, n, q_begin, rows, keys, masked).
# Non-causal rows over 300 keys (more than one pass of 256 threads) with one example fully
# masked (the no-visible-key branch); causal blocks past the first, with and without padding.
ATTENTION_BLOCKS = [
    (False, 300, 0, 3, 300, True),
    (True, 20, 5, 3, 8, False),
    (True, 20, 5, 3, 8, True),
    (True, 40, 0, 40, 40, False),
]
ATTENTION_IDS = ["full-masked", "causal-block", "causal-block-masked", "causal-whole"]
HEADS_KV, GROUP, BATCH = 2, 2, 2


def attention_setup(block, dtype):
    causal, n, q_begin, rows, keys, masked = block
    g = torch.Generator().manual_seed(n + q_begin)
    scores = (3 * torch.randn(BATCH * HEADS_KV, GROUP * rows, keys, generator=g)).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(BATCH, n, generator=g) > 0.3
        mask[0] = False  # example 0 sees no key
        mask[1, :2] = False
    r = torch.arange(GROUP * rows)
    i = q_begin + r % rows
    head = r // rows
    j = torch.arange(keys)
    visible = (
        j[None, None, :]
        < (torch.clamp(i + 1, max=keys) if causal else torch.full_like(i, keys))[None, :, None]
    )
    if mask is not None:
        example = torch.arange(BATCH * HEADS_KV) // HEADS_KV
        visible = visible & mask[example][:, None, :keys]
    visible = visible.expand(BATCH * HEADS_KV, -1, -1)
    bh = torch.arange(BATCH * HEADS_KV)[:, None]
    lse_index = (bh * GROUP + head[None, :]) * n + i[None, :]  # [BH, R] into lse.view(-1)
    args = (HEADS_KV, GROUP, n, q_begin, rows, causal, 0.125)
    return scores, mask, visible, lse_index, args


def reference_softmax(scores, visible, scale):
    s = torch.where(visible, scores.double() * scale, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.where(visible, torch.exp(s - lse[..., None]), 0.0).nan_to_num(0.0)
    return probs, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_IDS)
def test_softmax_rows_kernel(kernels, warp_order, dtype, block):
    scores, mask, visible, lse_index, args = attention_setup(block, dtype)
    n = args[2]
    probs = scores.clone()
    lse = torch.full((BATCH * HEADS_KV, GROUP, n), math.nan, dtype=dtype)
    kernels.softmax_rows_kernel(probs, lse, mask, *args)
    expected_probs, expected_lse = reference_softmax(scores, visible, args[-1])
    torch.testing.assert_close(probs, expected_probs.to(dtype))
    flat = lse.view(-1)
    torch.testing.assert_close(flat[lse_index], expected_lse.to(dtype))
    untouched = torch.ones_like(flat, dtype=torch.bool)
    untouched[lse_index.reshape(-1)] = False
    assert flat[untouched].isnan().all(), "lse written outside the block's rows"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_IDS)
def test_probs_rows_kernel(kernels, dtype, block):
    scores, mask, visible, lse_index, args = attention_setup(block, dtype)
    n = args[2]
    expected_probs, expected_lse = reference_softmax(scores, visible, args[-1])
    lse = torch.full((BATCH * HEADS_KV, GROUP, n), math.nan, dtype=dtype)
    lse.view(-1)[lse_index] = expected_lse.to(dtype)
    probs = scores.clone()
    kernels.probs_rows_kernel(probs, lse, mask, *args)
    torch.testing.assert_close(probs, expected_probs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_kernel(kernels, warp_order, dtype):
    rows, d = 7, 70  # d > 64 threads: a second pass with a tail
    g = torch.Generator().manual_seed(7)
    out = torch.randn(rows, d, generator=g).to(dtype)
    o2 = torch.randn(rows, d, generator=g).to(dtype)
    lse = torch.randn(rows, generator=g).to(dtype)
    lse[2] = -math.inf  # a row whose sequence part saw no key
    lse2 = torch.randn(rows, generator=g).to(dtype)
    merged_out, merged_lse = out.clone(), lse.clone()
    kernels.merge_kernel(merged_out, merged_lse, o2, lse2)
    both = torch.stack([lse.double(), lse2.double()])
    expected_lse = torch.logsumexp(both, dim=0)
    w = torch.exp(both - expected_lse)
    expected_out = w[0, :, None] * out.double() + w[1, :, None] * o2.double()
    torch.testing.assert_close(merged_lse, expected_lse.to(dtype))
    torch.testing.assert_close(merged_out, expected_out.to(dtype))
    torch.testing.assert_close(merged_out[2], o2[2], rtol=0, atol=0)


# ---- the emulator itself ---------------------------------------------------------------


def test_emulated_warp_operations(kernels):
    out = torch.tensor(kernels.warp_operations()).view(64, 8)
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    odd_lanes = sum(1 << i for i in range(1, 32, 2)) - 2**32  # as a signed 32-bit int
    torch.testing.assert_close(out[:, 0], base + 3)  # __shfl_sync from lane 3
    torch.testing.assert_close(out[:, 1], torch.where(lane >= 1, t - 1, t))  # __shfl_up_sync 1
    torch.testing.assert_close(out[:, 2], torch.where(lane < 31, t + 1, t))  # __shfl_down_sync 1
    torch.testing.assert_close(out[:, 3], base + (lane ^ 5))  # __shfl_xor_sync 5
    assert (out[:, 4] == odd_lanes).all() and (out[:, 5] == 1).all() and (out[:, 6] == 1).all()
    assert sorted(out[:, 7].tolist()) == list(range(64))  # atomicAdd: each old value once


@pytest.mark.parametrize(
    "kernel, message",
    [
        ("exit_before_barrier", r"has exited while .* waits at __syncthreads\(\)"),
        ("divergent_barriers", r"waits at __syncthreads\(\) at .*:\d+ while .* waits at .*:\d+"),
        ("partial_mask", r"mask 0xffff: only full-warp masks"),
        ("partial_warp", r"block of 48 threads: the last warp is partial"),
    ],
)
def test_emulator_reports_what_a_gpu_would_not_run(kernels, kernel, message):
    with pytest.raises(kernels.EmulationError, match=message):
        kernels.run_broken(kernel)


def test_emulator_exposes_a_missing_barrier(kernels, warp_order):
    # Each thread reads the value another warp wrote, with only __syncwarp() in between: the
    # warp that runs first reads shared memory before the other one has written it.
    out = torch.tensor(kernels.missing_barrier())
    first = slice(0, 32) if warp_order == "forward" else slice(32, 64)
    assert out[first].isnan().all()
