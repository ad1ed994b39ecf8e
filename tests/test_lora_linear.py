"""The fused LoRA linear op against peftkern.reference: values, gradients, dropout, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_low_precision, cuda_test
from torch.utils.checkpoint import checkpoint

import peftkern
from peftkern import reference
from peftkern.functional import draw_seed
from peftkern.ops import lora_linear_op


def make_inputs(
    M, K, N, r, *, dtype=torch.float64, adapter_dtype=None, device="cpu", bias=True, lead=(), seed=0
):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    return {
        "x": rand(*lead, M, K),
        "weight": rand(N, K, scale=max(K, 1) ** -0.5),
        "bias": rand(N) if bias else None,
        "lora_A": rand(r, K, scale=max(K, 1) ** -0.5, dt=adapter_dtype),
        "lora_B": rand(N, r, scale=r**-0.5, dt=adapter_dtype),
    }


def run_both(
    inp, scaling=0.5, dropout=0.0, requires_grad=("x", "weight", "bias", "lora_A", "lora_B"), grad=None
):
    """Runs peftkern and the reference with the same dropout seed and the same upstream
    gradient (`grad`, or a random one); returns outputs and grads."""
    leaves = {
        k: (v.detach().clone().requires_grad_(k in requires_grad) if v is not None else None)
        for k, v in inp.items()
    }
    ref_leaves = {
        k: (v.detach().clone().requires_grad_(k in requires_grad) if v is not None else None)
        for k, v in inp.items()
    }
    torch.manual_seed(1234)
    y = peftkern.lora_linear(
        leaves["x"],
        leaves["weight"],
        leaves["lora_A"],
        leaves["lora_B"],
        bias=leaves["bias"],
        scaling=scaling,
        dropout=dropout,
    )
    torch.manual_seed(1234)
    seed = int(draw_seed(inp["x"].device)) if dropout > 0 else 0
    y_ref = reference.lora_linear(
        ref_leaves["x"],
        ref_leaves["weight"],
        ref_leaves["lora_A"],
        ref_leaves["lora_B"],
        ref_leaves["bias"],
        scaling,
        dropout,
        seed,
    )
    grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
    names = [k for k in requires_grad if leaves.get(k) is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad) if names else ()
    ref_grads = torch.autograd.grad(y_ref, [ref_leaves[k] for k in names], grad) if names else ()
    return y, y_ref, dict(zip(names, grads)), dict(zip(names, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize(
    "M,K,N,r,lead",
    [
        (1, 8, 8, 1, ()),
        (3, 13, 7, 2, ()),
        (17, 45, 29, 5, ()),
        (1023, 40, 24, 64, ()),
        (5, 33, 19, 4, (2, 3)),
        (0, 16, 8, 4, ()),
        (9, 259, 20, 3, ()),  # K = 259: a long row of Philox groups and a 3-element tail
        (4, 0, 6, 2, ()),
    ],  # K = 0: y is the bias
)
def test_matches_reference_float64(device, dropout, M, K, N, r, lead):
    inp = make_inputs(M, K, N, r, device=device, lead=lead)
    y, y_ref, grads, ref_grads = run_both(inp, dropout=dropout)
    assert y.shape == (*lead, M, N)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_matches_reference(device, dropout):
    inp = make_inputs(64, 96, 80, 16, dtype=torch.float32, device=device, lead=(2,))
    y, y_ref, grads, ref_grads = run_both(inp, dropout=dropout)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter_fp32", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_low_precision_error_at_most_twice_plain_pytorch(device, dtype, adapter_fp32, dropout):
    adapter_dtype = torch.float32 if adapter_fp32 else dtype
    inp = make_inputs(67, 96, 72, 8, dtype=dtype, adapter_dtype=adapter_dtype, device=device)
    truth_inp = {k: (v.double() if v is not None else None) for k, v in inp.items()}
    # One upstream gradient, in the low precision, for the kernel, plain PyTorch and the truth.
    grad = torch.randn(67, 72, dtype=torch.float64, device=device).to(dtype)
    y, y_plain, grads, plain_grads = run_both(inp, dropout=dropout, grad=grad)
    _, y_truth, _, truth_grads = run_both(truth_inp, dropout=dropout, grad=grad.double())
    assert y.dtype == dtype
    assert_close_low_precision(y, y_plain, y_truth, "y")
    for name in truth_grads:
        assert grads[name].dtype == inp[name].dtype, name
        assert_close_low_precision(grads[name], plain_grads[name], truth_grads[name], name)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    inp = make_inputs(24, 40, 16, 4, device=device)
    wide = torch.randn(40, 24, dtype=torch.float64, device=device)
    inp["x"] = wide.t()  # [24, 40], transposed strides
    assert not inp["x"].is_contiguous()
    y, y_ref, grads, ref_grads = run_both(inp, dropout=0.3)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grads["x"], ref_grads["x"])
    torch.testing.assert_close(grads["lora_A"], ref_grads["lora_A"])


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_base_gets_no_weight_grad(device):
    inp = make_inputs(9, 16, 12, 4, device=device)
    y, y_ref, grads, ref_grads = run_both(inp, requires_grad=("x", "lora_A", "lora_B"))
    assert set(grads) == {"x", "lora_A", "lora_B"}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name])


def test_backward_op_computes_only_requested_grads():
    inp = make_inputs(9, 16, 12, 4)
    y, S = lora_linear_op(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], 1.0, 0.0, None)
    grads = torch.ops.peftkern.lora_linear_backward(
        torch.ones_like(y),
        inp["x"],
        inp["weight"],
        inp["lora_A"],
        inp["lora_B"],
        S,
        1.0,
        0.0,
        None,
        [False, False, False, True, True],
    )
    assert [g.numel() for g in grads[:3]] == [0, 0, 0]
    assert grads[3].shape == inp["lora_A"].shape and grads[4].shape == inp["lora_B"].shape


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    inp = make_inputs(6, 7, 5, 3, device=device, lead=(2,))
    args = [inp[k].requires_grad_() for k in ("x", "weight", "lora_A", "lora_B", "bias")]
    for p in (0.0, 0.4):

        def fn(x, weight, lora_A, lora_B, bias, p=p):
            torch.manual_seed(7)  # the same dropout mask for every evaluation
            return peftkern.lora_linear(x, weight, lora_A, lora_B, bias=bias, scaling=0.8, dropout=p)

        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, p):
    # With A = I the op's S output is drop(x) itself: check share dropped and the scaling.
    K = 64
    x = torch.ones(4096, K, device=device)
    eye = torch.eye(K, device=device)
    torch.manual_seed(0)
    _, S = lora_linear_op(
        x,
        torch.zeros(3, K, device=device),
        None,
        eye,
        torch.zeros(3, K, device=device),
        1.0,
        p,
        draw_seed(x.device),
    )
    kept = S != 0
    n = kept.numel()
    dropped_share = 1 - kept.float().mean().item()
    assert abs(dropped_share - p) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(S[kept], torch.full_like(S[kept], 1 / (1 - p)))
    # Rows and columns are independent: no row or column is all-kept or all-dropped.
    assert kept.any(0).all() and (~kept).any(0).all()


@pytest.mark.parametrize("K", [37, 259])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the AVX-512 Philox
def test_dropout_mask_is_the_reference_mask(K, dtype):
    x = torch.randn(50, K, dtype=dtype)
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    zeros = torch.zeros(2, K, dtype=dtype)
    _, S = lora_linear_op(x, zeros, None, torch.eye(K, dtype=dtype), zeros, 1.0, 0.3, seed)
    expected = reference.dropout(x, 0.3, 123456789012345)
    assert torch.equal(S == 0, expected == 0)
    torch.testing.assert_close(S, expected, rtol=0 if dtype == torch.float64 else 1e-6, atol=0)


def test_cpu_result_does_not_depend_on_the_thread_count():
    # Dropout on and several row chunks (K = 256: 256 rows per 256 KiB chunk), which the
    # threads share out. The masked rank-r products run chunk by chunk, one thread each, and
    # dA sums per-chunk partials in chunk order: bitwise the same on any number of threads.
    # The other results pass through BLAS calls that may split their work by thread count
    # (dB's partials reduce over up to 1365 rows here), hence only close there.
    inp = make_inputs(1500, 256, 48, 8, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            results.append(run_both(inp, dropout=0.1, grad=torch.ones(1500, 48)))
    finally:
        torch.set_num_threads(threads)
    (y_a, _, g_a, _), (y_1, _, g_1, _), (y_b, _, g_b, _) = results
    assert torch.equal(y_a, y_b) and all(torch.equal(g_a[k], g_b[k]) for k in g_a)
    assert torch.equal(g_a["lora_A"], g_1["lora_A"])
    torch.testing.assert_close(y_a, y_1, rtol=1e-5, atol=1e-5)
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_1[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_reproducible_under_manual_seed(device):
    inp = make_inputs(33, 24, 16, 4, dtype=torch.float32, device=device)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(peftkern.lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], dropout=0.3))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("device", DEVICES)
def test_eval_mode_has_no_dropout(device):
    inp = make_inputs(9, 16, 12, 4, device=device)
    y = peftkern.lora_linear(
        inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], dropout=0.5, training=False
    )
    torch.testing.assert_close(
        y, reference.lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"])
    )


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_recomputation_draws_the_same_mask(device):
    layer = peftkern.LoRALinear(32, 24, r=4, lora_dropout=0.3).to(device).double()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 10, 32, dtype=torch.float64, device=device, requires_grad=True)

    def grads(use_checkpoint):
        torch.manual_seed(11)
        y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        return torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B])

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_saved_activations_are_x_S_and_seed(dropout, adapter_dtype):
    dtype = torch.bfloat16
    inp = make_inputs(40, 64, 48, 8, dtype=dtype, adapter_dtype=adapter_dtype)
    params = {id(inp[k]) for k in ("weight", "bias", "lora_A", "lora_B")}
    for k in ("lora_A", "lora_B"):
        inp[k].requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peftkern.lora_linear(
            inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], bias=inp["bias"], dropout=dropout
        )
    activations = [t for t in saved if id(t) not in params]
    x_bytes = inp["x"].numel() * inp["x"].element_size()
    s_bytes = 40 * 8 * inp["lora_A"].element_size()
    seed_bytes = 8 if dropout > 0 else 0
    assert sum(t.numel() * t.element_size() for t in activations) == x_bytes + s_bytes + seed_bytes
    assert any(t is inp["x"] for t in activations)  # x itself, never a copy (nor a float32 one)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"x": torch.randn(4, 15)}, r"x\.shape\[1\] must equal weight\.shape\[1\]"),
        ({"lora_A": torch.randn(4, 15)}, r"lora_A\.shape\[1\] must equal weight\.shape\[1\]"),
        ({"lora_B": torch.randn(11, 4)}, r"lora_B\.shape\[0\] must equal weight\.shape\[0\]"),
        ({"lora_B": torch.randn(12, 3)}, r"lora_B\.shape\[1\] must equal lora_A\.shape\[0\]"),
        ({"lora_A": torch.randn(0, 16), "lora_B": torch.randn(12, 0)}, r"rank r and must be > 0"),
        (
            {"weight": torch.randn(12, 16, dtype=torch.float64)},
            r"weight has dtype Double but x has dtype Float",
        ),
        (
            {
                "lora_A": torch.randn(4, 16, dtype=torch.float64),
                "lora_B": torch.randn(12, 4, dtype=torch.float64),
            },
            r"lora_A/lora_B must have the dtype of x",
        ),
        ({"bias": torch.randn(11)}, r"bias\.shape\[0\] must equal weight\.shape\[0\]"),
        ({"x": torch.tensor(1.0)}, r"x must have shape \[\.\.\., in_features\]"),
        ({"weight": torch.randn(12, 16, 1)}, r"weight must be 2-D"),
        ({"x": torch.randn(4, 16).to(torch.int32)}, r"x must be float64, float32, float16 or bfloat16"),
        (
            {"lora_B": torch.randn(12, 4, dtype=torch.float64)},
            r"lora_B has dtype Double but lora_A has dtype Float",
        ),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = {
        "x": torch.randn(4, 16),
        "weight": torch.randn(12, 16),
        "bias": torch.randn(12),
        "lora_A": torch.randn(4, 16),
        "lora_B": torch.randn(12, 4),
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        peftkern.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], bias=args["bias"])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range_is_refused(p):
    x, w, a, b = torch.randn(4, 16), torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        peftkern.lora_linear(x, w, a, b, dropout=p)
    with pytest.raises(RuntimeError, match=r"dropout must be in \[0, 1\)"):
        lora_linear_op(x, w, None, a, b, 1.0, p, torch.zeros(1, dtype=torch.int64))


def test_missing_or_malformed_seed_is_refused():
    x, w, a, b = torch.randn(4, 16), torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    with pytest.raises(RuntimeError, match="seed must be given when dropout > 0"):
        lora_linear_op(x, w, None, a, b, 1.0, 0.1, None)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        lora_linear_op(x, w, None, a, b, 1.0, 0.1, torch.zeros(2, dtype=torch.int64))


def test_mixed_devices_are_refused_at_trace_time():
    x = torch.randn(4, 16, device="meta")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on meta"):
        peftkern.lora_linear(
            x, torch.randn(12, 16), torch.randn(4, 16, device="meta"), torch.randn(12, 4, device="meta")
        )


@cuda_test
def test_mixed_devices_are_refused():
    x, w, a, b = (
        torch.randn(4, 16, device="cuda"),
        torch.randn(12, 16),
        torch.randn(4, 16, device="cuda"),
        torch.randn(12, 4, device="cuda"),
    )
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        peftkern.lora_linear(x, w, a, b)


@cuda_test
def test_cuda_and_cpu_draw_the_same_mask_for_the_same_seed():
    K = 40
    x = torch.randn(30, K)
    eye = torch.eye(K)
    zeros = torch.zeros(2, K)
    seed = torch.tensor([987654321], dtype=torch.int64)
    _, S_cpu = lora_linear_op(x, zeros, None, eye, zeros, 1.0, 0.25, seed)
    _, S_cuda = lora_linear_op(x.cuda(), zeros.cuda(), None, eye.cuda(), zeros.cuda(), 1.0, 0.25, seed.cuda())
    torch.testing.assert_close(S_cuda.cpu(), S_cpu, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_low_precision_with_float32_adapters(device):
    dtype = torch.bfloat16
    inp = make_inputs(33, 48, 40, 8, dtype=torch.float32, device=device)
    lora_A = inp["lora_A"].clone().requires_grad_()
    lora_B = inp["lora_B"].clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = peftkern.lora_linear(inp["x"], inp["weight"], lora_A, lora_B, bias=inp["bias"], scaling=0.5)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    cast = {k: (v.to(dtype) if k in ("x", "weight", "bias") else v) for k, v in inp.items()}
    expected = peftkern.lora_linear(
        cast["x"], cast["weight"], cast["lora_A"], cast["lora_B"], bias=cast["bias"], scaling=0.5
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
