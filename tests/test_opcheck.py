"""torch.library.opcheck on every torch.ops.peftkern operator: schema, fake kernel, autograd
registration and AOT dispatch agree with the real kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from op_samples import SAMPLES


def registered_ops() -> list[str]:
    return sorted(
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("peftkern::")
    )


def test_every_registered_op_has_samples():
    ops = registered_ops()
    assert "lora_linear" in ops
    assert set(ops) == set(SAMPLES), f"ops without samples: {set(ops) - set(SAMPLES)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", sorted(SAMPLES))
def test_opcheck(op_name, device):
    op = getattr(torch.ops.peftkern, op_name).default
    for args in SAMPLES[op_name](device):
        torch.library.opcheck(op, args)


def _first_sample_with_grad(op_name: str, device: str) -> tuple:
    """The first sample of op_name with a non-empty tensor argument that requires grad."""
    for args in SAMPLES[op_name](device):
        if any(isinstance(a, torch.Tensor) and a.requires_grad and a.numel() > 0 for a in args):
            return args
    pytest.fail(f"{op_name} has no sample with a non-empty tensor that requires grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["lora_linear", "bottleneck_adapter", "prefix_attention"])
def test_second_derivative_is_refused_in_words(op_name, device):
    # create_graph=True gives the usual first derivative; differentiating it again must be
    # refused with an error that says so (the backward kernels are not differentiable), never
    # a partial graph through the ATen calls inside them, i.e. a wrong second derivative.
    op = getattr(torch.ops.peftkern, op_name).default
    args = _first_sample_with_grad(op_name, device)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def first_grads(create_graph: bool) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(0)
        out = op(*args)[0]
        return torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=create_graph)

    plain, graphed = first_grads(False), first_grads(True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=rf"peftkern: {op_name} is differentiable once"):
        sum(g.pow(2).sum() for g in graphed).backward()
