"""The fused linear + cross-entropy op against peftkern.reference: loss and every gradient,
both row passes (the CPU's fused one and the generic ATen one the CUDA build uses), every
reduction and dtype, gradcheck, torch.compile, and errors that name the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_low_precision

import peftkern
from peftkern import reference
from peftkern.ops import linear_cross_entropy_op

REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(params=["fused", "generic"])
def rows_pass(request, monkeypatch):
    """Runs a test with the CPU's fused row pass and with the generic ATen one (the CUDA path)."""
    if request.param == "generic":
        monkeypatch.setenv("PEFTKERN_CE_GENERIC_ROWS", "1")
    return request.param


def make_inputs(M, H, V, *, lead=(), dtype=torch.float64, bias=True, ignored=0.25, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, V, (*lead, M), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignored] = -100
    return {
        "hidden": rand(*lead, M, H),
        # Logits of a few units: a softmax that is neither flat nor one-hot.
        "weight": rand(V, H, scale=3 * H**-0.5),
        "bias": rand(V) if bias else None,
        "labels": labels.to(device),
    }


def run(fn, inp, requires_grad=("hidden", "weight", "bias"), grad_scale=None, **kwargs):
    """Loss and gradients of `fn` (peftkern's or the reference), for an upstream gradient of
    grad_scale (a fixed random tensor for reduction none)."""
    leaves = {
        k: v.detach().clone().requires_grad_(k in requires_grad and v.is_floating_point())
        if v is not None
        else None
        for k, v in inp.items()
    }
    loss = fn(leaves["hidden"], leaves["weight"], leaves["labels"], bias=leaves["bias"], **kwargs)
    upstream = grad_scale if grad_scale is not None else torch.full_like(loss, 0.7)
    if any(leaves[k] is not None and leaves[k].requires_grad for k in requires_grad):
        loss.backward(upstream)
    grads = {k: leaves[k].grad for k in ("hidden", "weight", "bias") if leaves[k] is not None}
    return loss.detach(), grads


def assert_matches_reference(inp, rtol=1e-7, atol=1e-9, **kwargs):
    torch.manual_seed(0)
    upstream = None
    if kwargs.get("reduction") == "none":
        loss_dtype = torch.float64 if inp["hidden"].dtype == torch.float64 else torch.float32
        upstream = torch.randn(inp["labels"].shape, dtype=loss_dtype)
    loss, grads = run(peftkern.linear_cross_entropy, inp, grad_scale=upstream, **kwargs)
    ref_loss, ref_grads = run(reference.linear_cross_entropy, inp, grad_scale=upstream, **kwargs)
    assert loss.shape == ref_loss.shape and loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


SHAPES = [
    pytest.param(dict(M=1, H=8, V=5), id="one-token"),
    pytest.param(dict(M=17, H=12, V=37), id="V-not-a-multiple-of-the-vector"),
    pytest.param(dict(M=5, H=16, V=1000, lead=(3,)), id="leading-dims"),
    pytest.param(dict(M=0, H=8, V=11), id="no-rows"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_float64_matches_reference(rows_pass, shape, reduction, label_smoothing, softcap):
    assert_matches_reference(
        make_inputs(**shape), reduction=reduction, label_smoothing=label_smoothing, softcap=softcap
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_label_ignored(rows_pass, reduction):
    # mean over no counted token: nan, as in PyTorch; the gradients are zero either way.
    inp = make_inputs(6, 8, 13, ignored=1.0)
    assert_matches_reference(inp, reduction=reduction)
    loss, grads = run(peftkern.linear_cross_entropy, inp, reduction=reduction)
    assert torch.isnan(loss).item() if reduction == "mean" else (loss == 0).all()
    assert all((g == 0).all() for g in grads.values())


def assert_error_at_most_twice_plain_pytorch(inp, reduction, **kwargs):
    """The kernel's loss and gradients against a float64 truth: at most twice the error of the
    eager expression in the inputs' dtype."""
    truth_inp = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    upstream = torch.randn(inp["labels"].shape) if reduction == "none" else None
    common = dict(grad_scale=upstream, reduction=reduction, **kwargs)
    loss, grads = run(peftkern.linear_cross_entropy, inp, **common)
    plain_loss, plain_grads = run(reference.linear_cross_entropy, inp, **common)
    common["grad_scale"] = None if upstream is None else upstream.double()
    truth_loss, truth_grads = run(reference.linear_cross_entropy, truth_inp, **common)
    assert loss.dtype == torch.float32
    assert_close_low_precision(loss, plain_loss, truth_loss, "loss")
    for name in grads:
        assert grads[name].dtype == inp["hidden"].dtype
        assert_close_low_precision(grads[name], plain_grads[name], truth_grads[name], name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_over_several_chunks(rows_pass, reduction):
    # 300 rows × 30,000 logits is more than one CPU chunk (8M logits): the chunk boundary and
    # the gradient accumulation over chunks are exercised.
    inp = make_inputs(300, 24, 30_000, dtype=torch.float32, seed=3)
    assert_error_at_most_twice_plain_pytorch(inp, reduction, label_smoothing=0.05, softcap=20.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_error_at_most_twice_plain_pytorch(rows_pass, dtype, reduction):
    assert_error_at_most_twice_plain_pytorch(make_inputs(40, 32, 301, dtype=dtype, seed=5), reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_head_gets_no_gradient(rows_pass, reduction):
    inp = make_inputs(9, 8, 21)
    loss, grads = run(peftkern.linear_cross_entropy, inp, requires_grad=("hidden",), reduction=reduction)
    ref_loss, ref_grads = run(
        reference.linear_cross_entropy, inp, requires_grad=("hidden",), reduction=reduction
    )
    assert grads["weight"] is None and grads["bias"] is None
    torch.testing.assert_close(grads["hidden"], ref_grads["hidden"])


def test_forward_gradients_are_not_computed_without_grad():
    inp = make_inputs(4, 8, 10)
    with torch.no_grad():
        leaves = {
            k: (v.requires_grad_(True) if v is not None and v.is_floating_point() else v)
            for k, v in inp.items()
        }
        peftkern.linear_cross_entropy(
            leaves["hidden"], leaves["weight"], leaves["labels"], bias=leaves["bias"]
        )
    # Asked directly for none of them, the op returns empty gradients.
    out = linear_cross_entropy_op(
        inp["hidden"], inp["weight"], inp["bias"], inp["labels"], -100, "mean", 0.0, None, [False] * 3
    )
    assert [t.numel() for t in out[1:]] == [0, 0, 0]


def test_gradients_recomputed_when_forward_did_not_make_them(rows_pass):
    # The op called with grad_mask all False on inputs that require grad: backward recomputes.
    inp = make_inputs(7, 8, 19)
    leaves = [inp["hidden"].clone().requires_grad_(), inp["weight"].clone().requires_grad_()]
    loss, *_ = linear_cross_entropy_op(
        leaves[0], leaves[1], None, inp["labels"], -100, "mean", 0.1, 3.0, [False] * 3
    )
    loss.backward()
    ref_leaves = [inp["hidden"].clone().requires_grad_(), inp["weight"].clone().requires_grad_()]
    reference.linear_cross_entropy(*ref_leaves, inp["labels"], label_smoothing=0.1, softcap=3.0).backward()
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(rows_pass, reduction):
    inp = make_inputs(6, 5, 9, lead=(2,))
    hidden, weight, bias = (inp[k].requires_grad_() for k in ("hidden", "weight", "bias"))

    def fn(hidden, weight, bias):
        return peftkern.linear_cross_entropy(
            hidden, weight, inp["labels"], bias=bias, reduction=reduction, label_smoothing=0.1, softcap=4.0
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_compile_fullgraph_matches_eager():
    inp = make_inputs(12, 16, 50, dtype=torch.float32)

    def step(hidden, weight, bias, labels):
        return peftkern.linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        loss = fn(*leaves, inp["labels"])
        loss.backward()
        results.append((loss.detach(), *(leaf.grad for leaf in leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_logits_in_the_autocast_dtype(device):
    inp = make_inputs(8, 16, 33, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = peftkern.linear_cross_entropy(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"])
        ref = reference.linear_cross_entropy(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels must have one entry per row"),
        (dict(labels=torch.tensor([0, 1, 2, 99, 0, 1])), r"labels must be in \[0, 10\).*got 99"),
        (dict(labels=torch.tensor([0, 1, -3, 0, 0, 1])), "got -3"),
        (dict(labels=torch.zeros(6, dtype=torch.int32)), "labels must be int64"),
        (dict(weight=torch.randn(10, 7)), r"hidden.shape\[1\] must equal weight.shape\[1\]"),
        (dict(bias=torch.randn(9)), r"bias.shape\[0\] must equal weight.shape\[0\]"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "weight has dtype"),
    ],
)
def test_bad_input_is_refused_in_words(change, message):
    args = {
        "hidden": torch.randn(6, 8),
        "weight": torch.randn(10, 8),
        "labels": torch.zeros(6, dtype=torch.int64),
    }
    args.update(change)
    bias = args.pop("bias", None)
    with pytest.raises(RuntimeError, match=message):
        peftkern.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], bias=bias)


def test_unknown_reduction_is_refused_in_words():
    hidden, weight, labels = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        peftkern.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(RuntimeError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        linear_cross_entropy_op(hidden, weight, None, labels, -100, "avg", 0.0, None, [False] * 3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivative_is_refused_in_words(reduction):
    inp = make_inputs(5, 4, 7)
    hidden = inp["hidden"].requires_grad_()
    loss = peftkern.linear_cross_entropy(hidden, inp["weight"], inp["labels"], reduction=reduction)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad,) = torch.autograd.grad(loss.sum(), hidden, create_graph=True)
        grad.sum().backward()
