"""Shared test helpers: devices, dtypes and the low-precision comparison rule."""

from __future__ import annotations

import pytest
import torch

import peftkern  # noqa: F401  (loads the ops)

# Fixtures defined next to the helpers they serve.
pytest_plugins = ["peft_prefix_helpers"]

HAS_CUDA = torch.cuda.is_available()

# Marks for tests that need a GPU: skipped without one, selected by `pytest -m cuda`.
requires_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def cuda_test(test):
    """Decorator for a test that only makes sense on a GPU."""
    for mark in requires_cuda:
        test = mark(test)
    return test


def assert_close_low_precision(
    actual: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, name: str
) -> None:
    """The FlashAttention rule: the kernel's error against a float64 truth may be at most twice
    the error of plain PyTorch in the same dtype (plus a hair for results that are exact)."""
    actual_err = (actual.double() - truth.double()).abs().max().item()
    plain_err = (plain.double() - truth.double()).abs().max().item()
    scale = truth.abs().max().item() + 1e-12
    assert actual_err <= 2 * plain_err + 1e-5 * scale, (
        f"{name}: error {actual_err:.3g} vs plain {plain_err:.3g}"
    )
