"""Runs every torch.ops.peftkern operator on the GPU, forward and backward, on the opcheck
samples of tests/op_samples.py. Meant to run under `compute-sanitizer --tool memcheck`:
a clean exit with no sanitizer report means no out-of-bounds or misaligned access."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from op_samples import SAMPLES  # noqa: E402

import peftkern  # noqa: E402,F401


def main() -> None:
    for name, make_samples in sorted(SAMPLES.items()):
        op = getattr(torch.ops.peftkern, name).default
        for args in make_samples("cuda"):
            outputs = op(*args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            differentiable = [o for o in outputs if o.requires_grad]
            if differentiable:
                torch.autograd.backward(differentiable, [torch.ones_like(o) for o in differentiable])
        torch.cuda.synchronize()
        print(f"{name}: {len(make_samples('cuda'))} samples ran")


if __name__ == "__main__":
    main()
