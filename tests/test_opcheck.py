"""torch.library.opcheck on every torch.ops.peftkern operator: schema, fake kernel, autograd
registration and AOT dispatch agree with the real kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from op_samples import SAMPLES


def registered_ops() -> list[str]:
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("peftkern::"))


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
