"""The fused DoRA linear op against peftkern.reference and against peft's own DoRA layer:
values, every gradient, dropout, the norm, memory, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_low_precision
from torch.utils.checkpoint import checkpoint

import peftkern
from peftkern import reference
from peftkern.functional import draw_seed, weight_norm_sq
from peftkern.ops import dora_linear_op

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def make_inputs(
    M, K, N, r, *, dtype=torch.float64, adapter_dtype=None, device="cpu", bias=True, lead=(), seed=0
):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    weight = rand(N, K, scale=max(K, 1) ** -0.5)
    magnitude = torch.linalg.vector_norm(weight.double(), dim=1) * (1 + 0.3 * torch.rand(N, generator=g))
    return {
        "x": rand(*lead, M, K),
        "weight": weight,
        "bias": rand(N) if bias else None,
        "lora_A": rand(r, K, scale=max(K, 1) ** -0.5, dt=adapter_dtype),
        "lora_B": rand(N, r, scale=r**-0.5, dt=adapter_dtype),
        "magnitude": magnitude.to(device=device, dtype=adapter_dtype),
    }


def leaves_of(inp, requires_grad):
    return {
        k: (v.detach().clone().requires_grad_(k in requires_grad) if v is not None else None)
        for k, v in inp.items()
    }


def call_peftkern(t, scaling, dropout):
    return peftkern.dora_linear(
        t["x"],
        t["weight"],
        t["lora_A"],
        t["lora_B"],
        t["magnitude"],
        bias=t["bias"],
        scaling=scaling,
        dropout=dropout,
    )


def run_both(inp, scaling=0.5, dropout=0.0, requires_grad=NAMES, reference_dtype=None):
    """peftkern and the reference (in reference_dtype, default the inputs' own) with the same
    dropout seed and upstream gradient; returns outputs and gradients."""
    leaves = leaves_of(inp, requires_grad)
    cast = (lambda v: v.to(reference_dtype)) if reference_dtype else (lambda v: v)
    ref_leaves = leaves_of({k: cast(v) if v is not None else None for k, v in inp.items()}, requires_grad)
    torch.manual_seed(1234)
    y = call_peftkern(leaves, scaling, dropout)
    torch.manual_seed(1234)
    seed = int(draw_seed(inp["x"].device)) if dropout > 0 else 0
    y_ref = reference.dora_linear(
        *(ref_leaves[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude")),
        ref_leaves["bias"],
        scaling,
        dropout,
        seed,
    )
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    names = [k for k in requires_grad if leaves.get(k) is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad.to(y.device, y.dtype))
    ref_grads = torch.autograd.grad(y_ref, [ref_leaves[k] for k in names], grad.to(y.device, y_ref.dtype))
    return y, y_ref, dict(zip(names, grads)), dict(zip(names, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "M,K,N,r,lead",
    [
        (1, 16, 12, 4, ()),
        (17, 1, 13, 1, ()),
        (33, 24, 13, 1, ()),
        (5, 40, 37, 3, (2, 3)),
        (130, 64, 72, 8, ()),
    ],
)
def test_matches_reference_float64(device, dropout, bias, M, K, N, r, lead):
    inp = make_inputs(M, K, N, r, device=device, bias=bias, lead=lead)
    y, y_ref, grads, ref_grads = run_both(inp, scaling=0.7, dropout=dropout)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(NAMES) - ({"bias"} if not bias else set())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_low_precision_within_twice_plain_pytorch(device, dropout, dtype, adapter_dtype):
    inp = make_inputs(67, 96, 40, 8, dtype=dtype, adapter_dtype=adapter_dtype, device=device)
    y, y_plain, grads, plain_grads = run_both(inp, dropout=dropout)
    _, y_true, _, true_grads = run_both(inp, dropout=dropout, reference_dtype=torch.float64)
    assert y.dtype == dtype
    assert_close_low_precision(y, y_plain, y_true, "y")
    for name in grads:
        assert grads[name].dtype == inp[name].dtype, name
        if adapter_dtype == dtype != torch.float32:
            # All in bfloat16: z = x_d·Wᵀ + s·S·Bᵀ is kept in x's dtype (one rounding more than
            # plain PyTorch's two separate terms), so a gradient's single worst element can be
            # a little over twice plain's; bound it by bfloat16's own resolution instead.
            err = (grads[name].double() - true_grads[name]).abs().max().item()
            assert err <= 2 * torch.finfo(dtype).eps * true_grads[name].abs().max().item(), name
        else:
            assert_close_low_precision(grads[name], plain_grads[name], true_grads[name], name)


def test_frozen_base_asks_only_for_adapter_gradients():
    inp = make_inputs(9, 16, 12, 4)
    y, y_ref, grads, ref_grads = run_both(inp, requires_grad=("lora_A", "lora_B", "magnitude"))
    torch.testing.assert_close(y, y_ref)
    for name in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    y, y_ref, grads, ref_grads = run_both(inp, dropout=0.3, requires_grad=("magnitude",))
    torch.testing.assert_close(grads["magnitude"], ref_grads["magnitude"])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck(dropout):
    # The norm ‖W + s·B·A‖ is a constant for autograd (peft's and the paper's definition), so
    # finite differences in W, A or B (which move the norm) disagree with the gradient by
    # design: those are checked against the reference's autograd above. x, bias and the
    # magnitude leave the norm alone and are checked numerically here.
    inp = make_inputs(5, 7, 6, 2)
    for name in ("x", "bias", "magnitude"):
        inp[name].requires_grad_()
    args = [inp[k] for k in NAMES]

    def f(x, weight, bias, lora_A, lora_B, magnitude):
        torch.manual_seed(3)  # the same dropout mask on every evaluation
        return peftkern.dora_linear(
            x, weight, lora_A, lora_B, magnitude, bias=bias, scaling=0.8, dropout=dropout
        )

    assert torch.autograd.gradcheck(f, args)


def test_initial_state_equals_the_base_layer():
    # DoRA starts with B = 0 and magnitude = ‖W‖: y is the base layer's output, dropout or not.
    linear = torch.nn.Linear(24, 10)
    layer = peftkern.DoRALinear.from_linear(linear, r=4, lora_alpha=8, lora_dropout=0.2)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_when_the_update_is_tiny_next_to_w(dtype):
    # ‖s·B·A‖ ~ 1e-6·‖W‖: the norm must still be ‖W + s·B·A‖ to the precision of its dtype,
    # and the DoRA scale c − 1 (which multiplies x·Wᵀ) must keep the tiny update's effect.
    inp = make_inputs(
        8, 64, 32, 4, dtype=dtype, adapter_dtype=torch.float32 if dtype == torch.bfloat16 else dtype
    )
    inp["lora_B"] = inp["lora_B"] * 1e-6
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = inp["weight"].double()
    delta = 0.5 * inp["lora_B"].double() @ inp["lora_A"].double()
    truth = torch.linalg.vector_norm(w + delta, dim=1)
    _, _, _, norm = dora_linear_op(
        inp["x"],
        inp["weight"],
        None,
        inp["lora_A"],
        inp["lora_B"],
        inp["magnitude"],
        weight_norm_sq(inp["weight"], norm_dtype),
        0.5,
        0.0,
        None,
    )
    assert norm.dtype == norm_dtype
    eps = torch.finfo(norm_dtype).eps
    torch.testing.assert_close(norm.double(), truth, rtol=8 * eps, atol=0)
    # The update moves the norm by ~1e-6 relative; in float64 that change is resolved exactly.
    if dtype == torch.float64:
        change = norm - torch.linalg.vector_norm(w, dim=1)
        torch.testing.assert_close(change, truth - torch.linalg.vector_norm(w, dim=1), rtol=1e-6, atol=1e-18)


def test_norm_never_nan_when_w_plus_update_vanishes():
    # W_n + s·B_n·A = 0 exactly for row 0: rounding may take n² below 0; it is clamped at 0.
    inp = make_inputs(4, 8, 3, 2)
    inp["weight"][0] = -0.5 * inp["lora_B"][0] @ inp["lora_A"]
    _, _, _, norm = dora_linear_op(
        inp["x"],
        inp["weight"],
        None,
        inp["lora_A"],
        inp["lora_B"],
        inp["magnitude"],
        weight_norm_sq(inp["weight"], torch.float64),
        0.5,
        0.0,
        None,
    )
    assert not norm.isnan().any()
    assert norm[0].item() < 1e-7


def test_norm_cache_follows_in_place_weight_updates():
    inp = make_inputs(6, 16, 12, 4)
    weight = inp["weight"].clone()
    first = weight_norm_sq(weight, torch.float64)
    assert weight_norm_sq(weight, torch.float64) is first  # cached while unchanged
    with torch.no_grad():
        weight.mul_(2.0)  # bumps the version counter
    second = weight_norm_sq(weight, torch.float64)
    torch.testing.assert_close(second, 4 * first)
    inp["weight"] = weight
    y, y_ref, _, _ = run_both(inp)
    torch.testing.assert_close(y, y_ref)


def test_dropout_is_reproducible_and_recomputed_under_checkpoint():
    inp = make_inputs(16, 32, 24, 4, dtype=torch.float32)
    t = leaves_of(inp, NAMES)
    torch.manual_seed(5)
    y1 = call_peftkern(t, 0.5, 0.3)
    torch.manual_seed(5)
    y2 = call_peftkern(t, 0.5, 0.3)
    assert torch.equal(y1, y2)
    y3 = call_peftkern(t, 0.5, 0.3)
    assert not torch.equal(y1, y3)

    def grads(use_checkpoint):
        leaves = leaves_of(inp, NAMES)
        torch.manual_seed(11)
        if use_checkpoint:
            y = checkpoint(
                lambda *a: call_peftkern(dict(zip(NAMES, a)), 0.5, 0.3),
                *(leaves[k] for k in NAMES),
                use_reentrant=False,
            )
        else:
            y = call_peftkern(leaves, 0.5, 0.3)
        return torch.autograd.grad(y.square().sum(), [leaves[k] for k in NAMES])

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_eval_mode_ignores_dropout():
    inp = make_inputs(6, 16, 12, 4, dtype=torch.float32)
    t = leaves_of(inp, ())
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"])
    y_eval = peftkern.dora_linear(*args, bias=t["bias"], scaling=0.5, dropout=0.5, training=False)
    y_plain = peftkern.dora_linear(*args, bias=t["bias"], scaling=0.5, dropout=0.0)
    assert torch.equal(y_eval, y_plain)


def test_empty_batch():
    inp = make_inputs(0, 16, 12, 4, dtype=torch.float32)
    y, y_ref, grads, ref_grads = run_both(inp, dropout=0.1)
    assert y.shape == (0, 12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_non_contiguous_inputs():
    inp = make_inputs(10, 16, 12, 4, dtype=torch.float32)
    inp["x"] = torch.randn(10, 32)[:, ::2]
    inp["weight"] = inp["weight"].t().contiguous().t()
    y, y_ref, grads, ref_grads = run_both(inp, dropout=0.2)
    torch.testing.assert_close(y, y_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_saved_activations_are_x_s_z_and_the_norm():
    M, K, N, r = 64, 48, 40, 4
    inp = make_inputs(M, K, N, r, dtype=torch.float32)
    t = leaves_of(inp, ("lora_A", "lora_B", "magnitude"))
    params = {id(t[k]) for k in ("weight", "lora_A", "lora_B", "magnitude")}
    saved = []

    def pack(tensor):
        if id(tensor) not in params and tensor.numel() > 1:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call_peftkern(t, 0.5, 0.1)
    assert sorted(saved) == sorted([(M, K), (M, r), (M, N), (N,)])


def test_no_weight_sized_allocation_per_call():
    # M < K so every weight-sized allocation (N×K elements or more) shows up: none but the
    # output and the gradients is allowed (peft builds a K×K identity and a K×N product).
    M, K, N, r = 16, 256, 192, 8
    inp = make_inputs(M, K, N, r, dtype=torch.float32)
    for dropout in (0.0, 0.1):
        t = leaves_of(inp, ("x", "lora_A", "lora_B", "magnitude"))
        call_peftkern(t, 0.5, dropout)  # warm the norm cache and the chunk workspaces
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            y = call_peftkern(t, 0.5, dropout)
            y.backward(torch.ones_like(y))
        sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
        assert sizes, "the profiler recorded no allocations"
        assert max(sizes) < N * K * 4, f"dropout {dropout}: an allocation of {max(sizes)} bytes"


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.update(magnitude=t["magnitude"][:-1]), "magnitude"),
        (lambda t: t.update(magnitude=t["magnitude"].double()), "magnitude"),
        (lambda t: t.update(magnitude=t["magnitude"][None]), "magnitude"),
        (lambda t: t.update(lora_B=t["lora_B"][:, :-1]), "lora_B"),
        (lambda t: t.update(x=t["x"][:, :-1]), "x"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    t = make_inputs(4, 8, 6, 2, dtype=torch.float32)
    change(t)
    with pytest.raises(RuntimeError, match=match):
        call_peftkern(t, 0.5, 0.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_outside_range_is_refused(p):
    t = make_inputs(4, 8, 6, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="dropout"):
        call_peftkern(t, 0.5, p)


def test_weight_norm_sq_of_wrong_dtype_is_refused():
    t = make_inputs(4, 8, 6, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="weight_norm_sq"):
        dora_linear_op(
            t["x"],
            t["weight"],
            None,
            t["lora_A"],
            t["lora_B"],
            t["magnitude"],
            torch.ones(6, dtype=torch.float64),
            1.0,
            0.0,
            None,
        )


def test_autocast_keeps_float32_adapters():
    inp = make_inputs(6, 16, 12, 4, dtype=torch.float32)
    t = leaves_of(inp, ("lora_A", "lora_B", "magnitude"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call_peftkern(t, 0.5, 0.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for name in ("lora_A", "lora_B", "magnitude"):
        assert t[name].grad.dtype == torch.float32
    y_ref = reference.dora_linear(
        *(inp[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude")), inp["bias"], 0.5
    )
    assert (y.float() - y_ref).abs().max() < 0.1
