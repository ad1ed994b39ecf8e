"""save_adapter / load_adapter with DoRA: peft's file format (lora_magnitude_vector) both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_models import peft_lora, tiny_llama, tokens
from peft import PeftModel
from safetensors.torch import load_file

import peftkern

QV = ("q_proj", "v_proj")


def trained_peft_dora(base):
    model = peft_lora(base, QV, use_dora=True)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return model.eval()


def test_peft_dora_loads_into_plain_model_and_matches(tmp_path):
    base = tiny_llama()
    theirs = trained_peft_dora(base)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = peftkern.load_adapter(ours, tmp_path)
    assert len(loaded) == 4
    assert all(isinstance(ours.get_submodule(n), peftkern.DoRALinear) for n in loaded)
    x = tokens()
    torch.testing.assert_close(ours.eval()(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_peftkern_dora_saves_what_peft_loads(tmp_path):
    base = tiny_llama()
    theirs = trained_peft_dora(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    peftkern.load_adapter(ours, tmp_path / "peft")
    peftkern.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["use_dora"] is True
    ours_file = load_file(tmp_path / "ours/adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    for key in peft_file:
        assert torch.equal(ours_file[key], peft_file[key]), key
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    x = tokens()
    torch.testing.assert_close(reloaded(x).logits, theirs(x).logits, rtol=1e-6, atol=1e-6)


def test_dora_file_into_lora_layers_is_refused(tmp_path):
    base = tiny_llama()
    trained_peft_dora(base).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    peftkern.inject_lora(model, target_modules=QV, r=4, lora_alpha=8)
    with pytest.raises(peftkern.AdapterFormatError, match="use_dora"):
        peftkern.load_adapter(model, tmp_path)


def test_lora_file_into_dora_layers_is_refused(tmp_path):
    base = tiny_llama()
    peft_lora(base, QV).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    peftkern.inject_lora(model, target_modules=QV, r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(peftkern.AdapterFormatError, match="use_dora"):
        peftkern.load_adapter(model, tmp_path)
