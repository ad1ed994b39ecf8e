"""Helpers shared by the tests of patch_peft on peft prefix-tuning models: a peft prefix model
of a tiny base model, a padding mask with right- and left-padded rows, the comparison of two
training steps, and the `prefix_calls` fixture (registered in conftest.py) counting the layers
that ran peftkern's prefix attention."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from peftkern.integrations import peft_patch_prefix

M = 5  # virtual tokens
LAYERS = 2
TIGHT = dict(rtol=1e-5, atol=1e-6)


def peft_prefix(base, projection: bool = False, **kwargs):
    """A peft prefix-tuning model on a copy of `base`; the prefix changes the outputs (peft's
    default initialisation is N(0, 1)), so equal outputs mean the prefix was applied."""
    extra = {"prefix_projection": True, "encoder_hidden_size": 24} if projection else {}
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M, **extra, **kwargs)
    return get_peft_model(copy.deepcopy(base), config)


def padding_mask(x: torch.Tensor) -> torch.Tensor:
    """Row 0 unpadded, row 1 right-padded, row 2 left-padded."""
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    mask[2, :4] = 0
    return mask


def assert_same_step(ours, theirs, **tol) -> None:
    """Two (logits, loss, {parameter name: grad}) triples are equal within `tol`, with the same,
    non-empty set of gradients."""
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    torch.testing.assert_close(ours[1], theirs[1], **tol)
    assert ours[2].keys() == theirs[2].keys() and ours[2]
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], msg=lambda m: f"{name}: {m}", **tol)


@pytest.fixture
def prefix_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The layer index of every call of peftkern's prefix attention during the test."""
    calls = []
    original = peft_patch_prefix.attend_with_prefix

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(peft_patch_prefix, "attend_with_prefix", counting)
    return calls
