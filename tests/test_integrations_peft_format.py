"""save_adapter / load_adapter: peft's on-disk format both ways, atomic writes, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_models import injected_like, lora_factors, peft_lora, tiny_bert, tiny_llama, tokens
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

import peftkern
from peftkern.integrations import peft_format

QV = ("q_proj", "v_proj")


def trained_injected(use_rslora: bool = False):
    """(base model, injected copy with trained-like LoRA weights, r=4, alpha=8)."""
    base = tiny_llama()
    model = injected_like(
        base, peft_lora(base, QV, use_rslora=use_rslora), QV, r=4, lora_alpha=8, use_rslora=use_rslora
    )
    return base, model.eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peftkern_save_loads_in_peft(tmp_path, use_rslora):
    base, model = trained_injected(use_rslora=use_rslora)
    peftkern.save_adapter(model, tmp_path)
    # the same keys peft itself writes for this configuration
    reference = peft_lora(base, QV, use_rslora=use_rslora)
    reference.save_pretrained(tmp_path / "peft")
    assert (
        load_file(tmp_path / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    )
    config = LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.use_rslora, sorted(config.target_modules)) == (
        4,
        8,
        use_rslora,
        list(QV),
    )
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("make_base,targets", [(tiny_llama, QV), (tiny_bert, ("query", "value"))])
def test_peft_save_loads_in_peftkern_plain_and_injected(tmp_path, make_base, targets):
    base = make_base()
    ref = peft_lora(base, targets).eval()
    ref.save_pretrained(tmp_path)
    x = tokens()
    expected = ref(x)[0]
    plain = copy.deepcopy(base)
    loaded = peftkern.load_adapter(plain, tmp_path)  # injects where the file has weights
    assert len(loaded) == 4 and all(isinstance(plain.get_submodule(n), peftkern.LoRALinear) for n in loaded)
    torch.testing.assert_close(plain(x)[0], expected, rtol=1e-6, atol=1e-6)
    injected = copy.deepcopy(base)
    peftkern.inject_lora(injected, targets, r=4, lora_alpha=8)
    peftkern.load_adapter(injected, tmp_path)
    torch.testing.assert_close(injected(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_round_trip_through_both_libraries_is_exact(tmp_path):
    base, model = trained_injected()
    peftkern.save_adapter(model, tmp_path / "a")
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").save_pretrained(tmp_path / "b")
    back = copy.deepcopy(base)
    peftkern.load_adapter(back, tmp_path / "b")
    ours, theirs = lora_factors(model), lora_factors(back)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_partial_targets_are_written_as_full_paths(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftkern.inject_lora(model, r".*layers\.1\.self_attn\.q_proj", r=4, lora_alpha=8)
    peftkern.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.q_proj"
    ]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "lora_A" in n] == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
    ]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    _, model = trained_injected()
    peftkern.save_adapter(model, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        peftkern.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert not list(tmp_path.glob(".*.tmp"))


def _corrupt_weights(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _wrong_rank(path):
    tensors = load_file(path / "adapter_model.safetensors")
    key = sorted(tensors)[-1]  # the last layer only: earlier layers must not be copied either
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    save_file(tensors, path / "adapter_model.safetensors")


def _unknown_module(path):
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, path / "adapter_model.safetensors")


def _edit_config(**changes):
    def edit(path):
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return edit


def _missing_factor(path):
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "damage,message",
    [
        (_corrupt_weights, "not a readable safetensors file"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "does not exist"),
        (_wrong_rank, r"v_proj.lora_B is \(16, 3\).*expected \(16, 4\)"),
        (_unknown_module, "model.layers.7.self_attn.q_proj.*lacks"),
        (_missing_factor, "lacks lora_A or lora_B"),
        (_edit_config(use_dora=True), "use_dora"),
        (_edit_config(peft_type="PREFIX_TUNING"), "only 'LORA'"),
    ],
)
@pytest.mark.parametrize("injected", [True, False])
def test_bad_files_are_refused_and_model_unchanged(tmp_path, damage, message, injected):
    base, model = trained_injected()
    peftkern.save_adapter(model, tmp_path)
    damage(tmp_path)
    target = model if injected else copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(peftkern.AdapterFormatError, match=message):
        peftkern.load_adapter(target, tmp_path)
    assert_unchanged(target, before)
    assert any(isinstance(m, peftkern.LoRALinear) for m in target.modules()) == injected


def test_scaling_that_differs_from_the_injected_model_is_refused(tmp_path):
    _, model = trained_injected()
    peftkern.save_adapter(model, tmp_path)
    _edit_config(lora_alpha=32)(tmp_path)
    before = snapshot(model)
    with pytest.raises(peftkern.AdapterFormatError, match="scaling 2.0 but .* has 8.0"):
        peftkern.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_save_refuses_models_without_lora_or_merged(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        peftkern.save_adapter(tiny_llama(), tmp_path)
    _, model = trained_injected()
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        peftkern.save_adapter(model, tmp_path)


def test_injected_model_with_other_layers_is_refused(tmp_path):
    _, model = trained_injected()
    peftkern.save_adapter(model, tmp_path)
    other = tiny_llama()
    peftkern.inject_lora(other, ("q_proj",), r=4, lora_alpha=8)
    with pytest.raises(peft_format.AdapterFormatError, match="LoRA layers and .* differ"):
        peftkern.load_adapter(other, tmp_path)
