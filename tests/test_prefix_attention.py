"""The prefix attention op against peftkern.reference (concatenation + SDPA with an explicit
mask): values, gradients, masks, grouped-query attention, precision, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_low_precision, cuda_test

import peftkern
from peftkern import reference
from peftkern.ops import prefix_attention_backward_op, prefix_attention_op

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def make_inputs(B, Hq, Hkv, n, m, d, *, dtype=torch.float64, device="cpu", shared=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    prefix_shape = (Hkv, m, d) if shared else (B, Hkv, m, d)
    return {
        "q": rand(B, Hq, n, d),
        "k": rand(B, Hkv, n, d),
        "v": rand(B, Hkv, n, d),
        "prefix_k": rand(*prefix_shape),
        "prefix_v": rand(*prefix_shape),
    }


def make_mask(B, n, kind, device="cpu", seed=1):
    """None, a random padding mask, or one with the first example fully padded."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, n, generator=g) > 0.3
    if kind == "fully_padded":
        keep[0] = False
    return keep.to(device)


def run(fn, inp, grad_out, **kwargs):
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in inp.items()}
    out = fn(*(leaves[k] for k in NAMES), **kwargs)
    grads = torch.autograd.grad(out, [leaves[k] for k in NAMES], grad_out)
    return out, dict(zip(NAMES, grads))


def both(inp, causal, mask, seed=2):
    g = torch.Generator().manual_seed(seed)
    q = inp["q"]
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device=q.device, dtype=q.dtype)
    kw = {"causal": causal, "key_padding_mask": mask}
    return run(peftkern.prefix_attention, inp, grad_out, **kw), run(
        reference.prefix_attention, inp, grad_out, **kw
    )


def assert_all_close(actual, expected, **tol):
    (out, grads), (ref_out, ref_grads) = actual, expected
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, **tol)
    for name in NAMES:
        assert not grads[name].isnan().any(), name
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


SHAPES = [  # B, Hq, Hkv, n, m, d
    (1, 1, 1, 1, 0, 8),
    (1, 2, 2, 1, 1, 16),
    (2, 4, 2, 17, 20, 32),
    (3, 6, 2, 17, 1, 16),
    (2, 3, 3, 5, 0, 8),
    (2, 2, 1, 9, 5, 17),  # head_dim and m off the 16-float vector width of the CPU kernel
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "random", "fully_padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, shape, shared, causal, mask_kind, dtype):
    # On CPU float64 runs the blockwise path (the one CUDA uses) and float32 the fused kernel.
    B, Hq, Hkv, n, m, d = shape
    inp = make_inputs(B, Hq, Hkv, n, m, d, dtype=dtype, device=device, shared=shared)
    mask = make_mask(B, n, mask_kind, device)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_all_close(*both(inp, causal, mask), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(0, 4, 2, 7, 3, 16), (2, 4, 2, 0, 3, 16)], ids=["empty_batch", "empty_sequence"]
)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_batch_or_sequence(device, shape, shared, mask_kind, dtype):
    # ATen's fused CPU kernel divides by the sequence length and the fused prefix pass by the
    # batch-head count: empty inputs must take a path that handles them, not crash.
    B, _, _, n, _, _ = shape
    inp = make_inputs(*shape, dtype=dtype, device=device, shared=shared)
    assert_all_close(*both(inp, True, make_mask(B, n, mask_kind, device)))


def test_head_dim_zero_is_refused():
    inp = make_inputs(1, 2, 2, 3, 1, 0)
    with pytest.raises(RuntimeError, match=r"q.shape\[3\] \(head_dim\) must be > 0"):
        peftkern.prefix_attention(*(inp[k] for k in NAMES))


def as_model_layout(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, n, d] as a model's projection makes it: [B, n, H, d] memory seen transposed."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_model_layout_is_read_in_place_and_kept(device, dtype):
    """q, k, v in the [B, n, H, d] memory of projections: the same values as contiguous inputs,
    and out and the gradients come back in that layout (no copy on either side)."""
    inp = make_inputs(2, 4, 2, 17, 5, 16, dtype=dtype, device=device)
    strided = {k: as_model_layout(t) if k in ("q", "k", "v") else t for k, t in inp.items()}
    mask = make_mask(2, 17, "random", device)
    (out, grads), _ = result = both(strided, True, mask)
    assert out.stride() == strided["q"].stride()
    for name in ("q", "k", "v"):
        assert grads[name].stride() == strided[name].stride(), name
    contiguous_out = peftkern.prefix_attention(*(inp[k] for k in NAMES), key_padding_mask=mask)
    assert contiguous_out.stride() == strided["q"].stride()  # the same layout for any input
    if dtype == torch.bfloat16:  # against the contiguous run: only the input layout differs
        assert_all_close(result[0], both(inp, True, mask)[0], rtol=2e-2, atol=2e-2)
    else:
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert_all_close(*result, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [0, 1, 20])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_sequence(device, m, causal, dtype):
    inp = make_inputs(1, 2, 1, 513, m, 16, dtype=dtype, device=device, shared=False)
    mask = make_mask(1, 513, "random", device)
    assert_all_close(*both(inp, causal, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_head_dims_float32(device, d):
    inp = make_inputs(2, 4, 2, 33, 20, d, dtype=torch.float32, device=device)
    mask = make_mask(2, 33, "random", device)
    assert_all_close(*both(inp, True, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", ["random", "none"])  # on a GPU "none" runs FlashAttention
def test_low_precision_error_at_most_twice_plain_pytorch(device, dtype, shared, causal, mask_kind):
    inp64 = make_inputs(2, 4, 2, 65, 20, 64, device=device, shared=shared)
    inp = {k: t.to(dtype) for k, t in inp64.items()}
    mask = make_mask(2, 65, mask_kind, device)
    (out, grads), (plain, plain_grads) = both(inp, causal, mask)
    # The truth: the float64 reference on exactly the rounded inputs and output gradient.
    _, (truth, truth_grads) = both({k: t.double() for k, t in inp.items()}, causal, mask)
    assert out.dtype == dtype
    assert_close_low_precision(out, plain, truth, "out")
    for name in NAMES:
        assert grads[name].dtype == dtype
        assert_close_low_precision(grads[name], plain_grads[name], truth_grads[name], name)


@cuda_test
@pytest.mark.parametrize("shape", [(2, 8, 2, 513, 20, 128), (1, 4, 4, 1, 0, 64), (2, 4, 1, 17, 1, 32)])
def test_cuda_half_precision_without_mask_runs_flash_attention(shape):
    """The GPU path for the common training case: ATen's FlashAttention-2 for the sequence part
    (grouped-query heads as they are), merged with the prefix part; checked against the
    float64 truth with the low-precision rule, and by the kernels it launched."""
    B, Hq, Hkv, n, m, d = shape
    inp = {k: t.to(torch.bfloat16) for k, t in make_inputs(B, Hq, Hkv, n, m, d, device="cuda").items()}
    grad_out = torch.randn_like(inp["q"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, grads = run(peftkern.prefix_attention, inp, grad_out, causal=True)
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention" in ops
    assert "aten::_scaled_dot_product_flash_attention_backward" in ops
    plain, plain_grads = run(reference.prefix_attention, inp, grad_out, causal=True)
    truth, truth_grads = run(
        reference.prefix_attention, {k: t.double() for k, t in inp.items()}, grad_out.double(), causal=True
    )
    assert_close_low_precision(out, plain, truth, "out")
    for name in NAMES:
        assert_close_low_precision(grads[name], plain_grads[name], truth_grads[name], name)


def test_m0_is_plain_attention():
    inp = make_inputs(2, 4, 4, 9, 0, 16, dtype=torch.float32)
    out = peftkern.prefix_attention(*(inp[k] for k in NAMES))
    expected = torch.nn.functional.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fully_padded_row_without_prefix_gives_zero_output_and_grads(dtype):
    inp = make_inputs(2, 2, 1, 4, 0, 8, dtype=dtype)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    (out, grads), _ = both(inp, False, mask)
    assert (out[1] == 0).all() and (grads["q"][1] == 0).all()
    _, lse = prefix_attention_op(*(inp[k] for k in NAMES), mask, False, 0.5)
    assert torch.isneginf(lse[1]).all() and lse[0].isfinite().all()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [0, 2])
def test_gradcheck_float64(shared, causal, m):
    inp = make_inputs(2, 2, 1, 4, m, 3, shared=shared)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    leaves = [inp[k].requires_grad_(True) for k in NAMES]

    def fn(*args):
        return peftkern.prefix_attention(*args, causal=causal, key_padding_mask=mask, scale=0.7)

    assert torch.autograd.gradcheck(fn, leaves)


def test_scale_argument():
    inp = make_inputs(1, 2, 2, 6, 3, 8)
    out = peftkern.prefix_attention(*(inp[k] for k in NAMES), scale=0.3)
    expected = reference.prefix_attention(*(inp[k] for k in NAMES), scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    inp = make_inputs(2, 4, 2, 7, 5, 16, dtype=torch.float32, device=device)
    # [B, n, H, d] projections viewed as [B, H, n, d], as attention layers produce them.
    strided = {
        k: (
            t.transpose(-2, -3).contiguous().transpose(-2, -3)
            if t.dim() == 4
            else t.transpose(0, 1).contiguous().transpose(0, 1)
        )
        for k, t in inp.items()
    }
    assert not strided["q"].is_contiguous()
    (out, grads), _ = both(strided, True, None)
    (ref_out, ref_grads), _ = both(inp, True, None)
    torch.testing.assert_close(out, ref_out)
    for name in NAMES:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_gradient_is_bitwise_deterministic(device):
    inp = make_inputs(8, 4, 2, 40, 20, 32, dtype=torch.float32, device=device)
    mask = make_mask(8, 40, "random", device)
    first = both(inp, True, mask)[0][1]
    for _ in range(2):
        again = both(inp, True, mask)[0][1]
        for name in ("prefix_k", "prefix_v", "q", "k", "v"):
            assert torch.equal(first[name], again[name]), name


def test_cpu_float32_result_does_not_depend_on_the_thread_count():
    # Several query blocks, key blocks (n > 256) and forward spans (which depend on the thread
    # count); GQA, head_dim off the vector width, padding mask. A forward span starts at a
    # multiple of the query block, so it never changes a row's arithmetic; a backward unit owns
    # one (example, query head) and, with GQA, its own share of the key/value and prefix
    # gradients, summed over each group in a fixed order. So the results are bitwise the same
    # on any number of threads.
    inp = make_inputs(2, 4, 2, 300, 7, 24, dtype=torch.float32)
    mask = make_mask(2, 300, "random")
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(both(inp, True, mask)[0])
    finally:
        torch.set_num_threads(threads)
    (out_1, grads_1), *others = results
    for out, grads in others:
        assert torch.equal(out, out_1)
        for name in NAMES:
            assert torch.equal(grads[name], grads_1[name]), name


def test_backward_op_computes_only_requested_grads():
    inp = make_inputs(2, 2, 1, 5, 3, 8)
    args = [inp[k] for k in NAMES]
    out, lse = prefix_attention_op(*args, None, True, 0.5)
    grads = prefix_attention_backward_op(
        torch.ones_like(out), *args, None, out, lse, True, 0.5, [False, False, False, True, False]
    )
    assert [g.numel() == 0 for g in grads] == [True, True, True, False, True]
    full = prefix_attention_backward_op(torch.ones_like(out), *args, None, out, lse, True, 0.5, [True] * 5)
    torch.testing.assert_close(grads[3], full[3], rtol=0, atol=0)


def test_saves_only_inputs_output_and_lse():
    inp = make_inputs(2, 4, 2, 16, 4, 8, dtype=torch.float32)
    leaves = {k: t.clone().requires_grad_(True) for k, t in inp.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = peftkern.prefix_attention(*(leaves[k] for k in NAMES))
    allowed = {t.untyped_storage().data_ptr() for t in (*leaves.values(), out)}
    extra = [t for t in saved if t is not None and t.untyped_storage().data_ptr() not in allowed]
    assert len(extra) == 1 and extra[0].shape == (2, 4, 16) and extra[0].dtype == torch.float32  # lse


BAD_INPUTS = [
    (
        {"k": (2, 3, 5, 8), "v": (2, 3, 5, 8), "prefix_k": (3, 2, 8), "prefix_v": (3, 2, 8)},
        r"q\.shape\[1\].*multiple of k\.shape\[1\]",
    ),
    ({"k": (2, 2, 5, 16), "v": (2, 2, 5, 16)}, r"k\.shape\[3\] must equal q\.shape\[3\]"),
    ({"v": (2, 2, 6, 8)}, r"v must have the shape of k"),
    ({"prefix_k": (2, 3, 4)}, r"prefix_k\.shape\[2\] must equal q\.shape\[3\]"),
    ({"prefix_k": (3, 2, 3, 8), "prefix_v": (3, 2, 3, 8)}, r"prefix_k\.shape\[0\] must equal q\.shape\[0\]"),
    ({"prefix_v": (2, 4, 8)}, r"prefix_v must have the shape of prefix_k"),
    ({"prefix_k": (3, 8), "prefix_v": (3, 8)}, r"prefix_k must be \[kv_heads, m, head_dim\]"),
    ({"q": (2, 4, 5)}, r"q must be 4-D"),
]


# float32 runs the CPU's flash kernel and float64 the merge orchestration: both check alike.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("changes,message", BAD_INPUTS)
def test_bad_shapes_name_the_argument(changes, message, dtype):
    shapes = {
        "q": (2, 4, 5, 8),
        "k": (2, 2, 5, 8),
        "v": (2, 2, 5, 8),
        "prefix_k": (2, 3, 8),
        "prefix_v": (2, 3, 8),
    }
    shapes.update(changes)
    args = [torch.randn(*shapes[k], dtype=dtype) for k in NAMES]
    with pytest.raises(RuntimeError, match=message):
        prefix_attention_op(*args, None, True, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name,shape,message",
    [
        ("grad_out", (2, 4, 5, 7), r"grad_out must have the shape of q"),
        ("out", (2, 4, 4, 8), r"out must have the shape of q"),
        ("lse", (2, 4, 5, 1), r"lse must have shape \[batch, heads, seq\] = \[2, 4, 5\]"),
    ],
)
def test_bad_backward_arguments_name_the_argument(name, shape, message, dtype):
    inp = make_inputs(2, 4, 2, 5, 3, 8, dtype=dtype)
    args = [inp[k] for k in NAMES]
    out, lse = prefix_attention_op(*args, None, True, 0.5)
    given = {"grad_out": torch.ones_like(out), "out": out, "lse": lse}
    given[name] = torch.zeros(shape, dtype=given[name].dtype)
    with pytest.raises(RuntimeError, match=message):
        prefix_attention_backward_op(
            given["grad_out"], *args, None, given["out"], given["lse"], True, 0.5, [True] * 5
        )


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.ones(2, 4, dtype=torch.bool), r"key_padding_mask must have shape \[batch, seq\] = \[2, 5\]"),
        (torch.ones(2, 5), r"key_padding_mask must be bool"),
    ],
)
def test_bad_mask_names_the_argument(mask, message):
    inp = make_inputs(2, 4, 2, 5, 3, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=message):
        peftkern.prefix_attention(*(inp[k] for k in NAMES), key_padding_mask=mask)


def test_dtype_mismatch_names_the_argument():
    inp = make_inputs(2, 4, 2, 5, 3, 8, dtype=torch.float32)
    inp["prefix_v"] = inp["prefix_v"].double()
    with pytest.raises(RuntimeError, match="prefix_v has dtype"):
        peftkern.prefix_attention(*(inp[k] for k in NAMES))
