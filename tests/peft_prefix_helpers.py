"""Helpers shared by the tests of patch_peft on peft prefix-tuning models: a peft prefix model
of a tiny base model, a padding mask with right- and left-padded rows, and a counter of the
layers that ran peftkern's prefix attention."""

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


def count_prefix_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The layer index of every call of peftkern's prefix attention from now on (undone with
    `monkeypatch`); a test module's fixture returns it."""
    calls = []
    original = peft_patch_prefix.attend_with_prefix

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(peft_patch_prefix, "attend_with_prefix", counting)
    return calls
