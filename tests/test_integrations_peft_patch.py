"""patch_peft: a `peft` LoRA model runs peftkern's fused op in place, same numbers, same files."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from lora_models import (
    LinearHost,
    assert_same_dropout_distribution,
    assert_same_lora_grads,
    lora_factors,
    peft_lora,
    tiny_llama,
    tokens,
)
from peft import LoraConfig
from torch import nn

import peftkern
from peftkern.integrations import peft_patch
from peftkern.integrations.binding import bound_function

QV = ("q_proj", "v_proj")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of peftkern's fused ops (LoRA and DoRA) made by patched layers."""
    calls = []

    def counting(op):
        def counted(*args, **kwargs):
            calls.append(kwargs.get("dropout"))
            return op(*args, **kwargs)

        return counted

    monkeypatch.setattr(peft_patch, "lora_linear", counting(peftkern.lora_linear))
    monkeypatch.setattr(peft_patch, "dora_linear", counting(peftkern.dora_linear))
    return calls


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach()


def test_patched_equals_peft_and_keeps_names_and_files(tmp_path, fused_calls):
    ref = peft_lora(tiny_llama(), QV).train()
    model = copy.deepcopy(ref)
    keys_before = list(model.state_dict())
    report = peftkern.patch_peft(model)
    assert report.num_patched == 4 and report.num_skipped == 0 and "patched 4" in str(report)
    assert list(model.state_dict()) == keys_before
    x = tokens()
    torch.testing.assert_close(loss_and_grads(model, x), loss_and_grads(ref, x), rtol=1e-6, atol=1e-6)
    assert_same_lora_grads(model, ref, rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == 4
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    saved, expected = (
        load_file(tmp_path / "patched/adapter_model.safetensors"),
        load_file(tmp_path / "ref/adapter_model.safetensors"),
    )
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert peftkern.patch_peft(model).num_patched == 4  # idempotent
    assert peftkern.unpatch_peft(model) == 4
    assert all("forward" not in m.__dict__ for m in model.modules())
    fused_calls.clear()
    loss_and_grads(model, x)
    assert not fused_calls


def test_state_changes_after_patching_fall_back_to_peft(fused_calls):
    ref = peft_lora(tiny_llama(), QV)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    for action in ("merge_adapter", "unmerge_adapter"):
        getattr(model, action)()
        getattr(ref, action)()
        fused_calls.clear()
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
        assert len(fused_calls) == (0 if action == "merge_adapter" else 4)
    with model.disable_adapter(), ref.disable_adapter():
        fused_calls.clear()
        torch.testing.assert_close(model(x).logits, ref(x).logits)
        assert not fused_calls


def test_mixed_adapter_batch_falls_back_with_a_warning(fused_calls):
    ref = peft_lora(tiny_llama(), QV)
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=list(QV), init_lora_weights=False))
    ref.eval()  # peft allows adapter_names in eval mode only
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x, names = tokens(batch=2), ["default", "other"]
    with pytest.warns(UserWarning, match="adapter_names"):
        out = model(x, adapter_names=names).logits
    torch.testing.assert_close(out, ref(x, adapter_names=names).logits)
    assert not fused_calls


@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora_bias"])
def test_dora_and_lora_bias_layers_are_patched_and_equal_peft(kwargs, monkeypatch):
    """Outputs and the gradient of every trainable parameter (magnitude and lora_B's bias
    included) equal peft's, through peftkern's DoRA or LoRA op."""
    calls = []
    for op in ("dora_linear", "lora_linear"):
        original = getattr(peft_patch, op)
        monkeypatch.setattr(
            peft_patch, op, lambda *a, _op=original, _n=op, **k: calls.append(_n) or _op(*a, **k)
        )
    ref = peft_lora(tiny_llama(), QV, **kwargs).train()
    with torch.no_grad():  # magnitude and lora_B's bias away from their initial values
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name or ("lora_B" in name and name.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.05)
    model = copy.deepcopy(ref)
    report = peftkern.patch_peft(model)
    assert report.num_patched == 4 and report.num_skipped == 0
    x = tokens()
    torch.testing.assert_close(loss_and_grads(model, x), loss_and_grads(ref, x), rtol=1e-5, atol=1e-6)
    assert set(calls) == {"dora_linear" if "use_dora" in kwargs else "lora_linear"} and len(calls) == 4
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys()
    assert any("magnitude" in n or n.endswith("lora_B.default.bias") for n in grads)
    for n in grads:
        torch.testing.assert_close(
            grads[n], expected[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_merged_several_active_and_non_linear_layers_are_skipped():
    merged = peft_lora(tiny_llama(), QV)
    merged.merge_adapter()
    assert all("merged" in r for r in peftkern.patch_peft(merged).skipped.values())

    several = peft_lora(tiny_llama(), QV)
    several.add_adapter("other", LoraConfig(r=2, target_modules=list(QV)))
    several.base_model.set_adapter(["default", "other"])
    report = peftkern.patch_peft(several)
    assert report.num_patched == 0 and all("2 active adapters" in r for r in report.skipped.values())

    embed = peft_lora(tiny_llama(), ("embed_tokens", "q_proj"))
    report = peftkern.patch_peft(embed)
    assert report.num_patched == 2
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]


def test_base_layer_with_hooks_is_skipped():
    model = peft_lora(tiny_llama(), QV)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.base_layer.register_forward_pre_hook(lambda module, args: None)
    report = peftkern.patch_peft(model)
    assert report.num_patched == 3
    assert "base_layer has hooks" in report.skipped["base_model.model.model.layers.0.self_attn.q_proj"]


def test_patch_peft_without_lora_layers_reports_nothing():
    assert peftkern.patch_peft(nn.Sequential(nn.Linear(2, 2))).num_patched == 0


def test_dropout_statistics_match_peft(fused_calls):
    p = 0.3
    ref = peft_lora(LinearHost(), ["proj"], r=4, lora_alpha=8, lora_dropout=p).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    assert_same_dropout_distribution(model, ref)
    assert fused_calls.count(p) == 3000  # every training-mode draw went through the fused op


def test_bfloat16_model_with_float32_adapters_is_patched(fused_calls):
    """peft keeps adapters of a bf16 model in fp32 by default; the fused op takes that mix."""
    base = tiny_llama().to(torch.bfloat16)
    ref = peft_lora(base, QV)
    assert (
        ref.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    )
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    ours, theirs = model(x).logits, ref(x).logits
    assert len(fused_calls) == 4 and ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_fused_with_autocast_dtypes(fused_calls, adapter_dtype):
    """Under autocast peft's linears run in bf16; the patched layer casts its operands the
    same way (fp32 adapters may stay fp32) and its results and grads agree to bf16 precision."""
    ref = peft_lora(tiny_llama(), QV)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens()
    losses = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert out.logits.dtype == torch.bfloat16
    assert len(fused_calls) == 4
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
    grads, ref_grads = lora_factors(model, grads=True), lora_factors(ref, grads=True)
    for key in grads:
        assert grads[key].dtype == adapter_dtype
        scale = ref_grads[key].float().abs().max()
        assert (grads[key].float() - ref_grads[key].float()).abs().max() <= 0.05 * scale, key


def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickled, "torch.save": _saved_and_loaded, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_whole_patched_model_round_trips_still_patched(trip, use_dora, fused_calls):
    ref = peft_lora(tiny_llama(), QV, use_dora=use_dora)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    loaded = ROUND_TRIPS[trip](model)
    patched = [m for m in loaded.modules() if bound_function(m) is peft_patch._fused_forward]
    assert len(patched) == 4
    # Each rebuilt forward runs the rebuilt layer, not the one it was copied from.
    assert all(m.forward.module is m for m in patched)
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == 4
    assert peftkern.unpatch_peft(loaded) == 4 and peftkern.unpatch_peft(model) == 4


def _q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


SUBMODULES = {
    "base_layer": lambda layer: layer.base_layer,
    "lora_A": lambda layer: layer.lora_A["default"],
    "lora_B": lambda layer: layer.lora_B["default"],
    "lora_dropout": lambda layer: layer.lora_dropout["default"],
}


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("child", list(SUBMODULES))
def test_hooks_added_after_patching_fire_and_change_the_output(child, kind, fused_calls):
    """peft calls base_layer, lora_A, lora_B and lora_dropout, so their hooks run; the patched
    layer hands calls to peft's forward while any such hook exists, and fuses again after."""
    ref = peft_lora(tiny_llama(), QV)
    model = copy.deepcopy(ref)
    assert peftkern.patch_peft(model).num_patched == 4
    calls = {"model": 0, "ref": 0}
    handles = []
    for key, m in (("model", model), ("ref", ref)):

        def forward_hook(module, args, output, key=key):
            calls[key] += 1
            return output * 1.5

        def forward_pre_hook(module, args, key=key):
            calls[key] += 1
            return (args[0] * 0.5,)

        hook = forward_hook if kind == "forward_hook" else forward_pre_hook
        handles.append(getattr(SUBMODULES[child](_q_proj(m)), f"register_{kind}")(hook))
    x = tokens()
    before = ref(x).logits
    calls["ref"] = 0
    torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    assert calls == {"model": 1, "ref": 0}
    assert len(fused_calls) == 3  # the hooked layer ran peft's forward, the others fused
    for handle in handles:
        handle.remove()
    fused_calls.clear()
    after = model(x).logits
    assert len(fused_calls) == 4
    assert not torch.allclose(after, before)  # the hook did change the output


def test_global_module_hooks_fire_on_patched_layers(fused_calls):
    ref = peft_lora(tiny_llama(), QV)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    seen: dict[str, list[type]] = {"model": [], "ref": []}
    x = tokens()
    for key, m in (("model", model), ("ref", ref)):
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, output, key=key: seen[key].append(type(module))
        )
        try:
            out = m(x).logits
        finally:
            handle.remove()
        if key == "model":
            patched_out = out
    torch.testing.assert_close(patched_out, out, rtol=1e-5, atol=1e-5)
    assert seen["model"] == seen["ref"] and nn.Linear in seen["model"]
    assert not fused_calls


def _first_layer_on_disk(model) -> dict[str, str]:
    """An accelerate device map that offloads layer 0 to disk and keeps the rest on the CPU."""
    inner = "base_model.model.model"
    device_map = {
        f"{inner}.{name}": "cpu"
        for name, _ in model.get_submodule(inner).named_children()
        if name != "layers"
    }
    num_layers = len(model.get_submodule(f"{inner}.layers"))
    device_map.update({f"{inner}.layers.{i}": "disk" if i == 0 else "cpu" for i in range(num_layers)})
    device_map["base_model.model.lm_head"] = "cpu"
    return device_map


@pytest.mark.parametrize("placement", ["dispatch_model", "cpu_offload"])
def test_accelerate_offloading_of_a_patched_model_gives_peft_outputs(placement, tmp_path, fused_calls):
    """accelerate hooks every sub-module of a dispatched or offloaded model (its weights move in
    before each call, from the disk or the meta device), so every layer runs peft's forward."""
    accelerate = pytest.importorskip("accelerate")
    ref = peft_lora(tiny_llama(), QV)
    model = copy.deepcopy(ref)
    assert peftkern.patch_peft(model).num_patched == 4
    if placement == "dispatch_model":
        accelerate.dispatch_model(
            model, device_map=_first_layer_on_disk(model), main_device="cpu", offload_dir=str(tmp_path)
        )
    else:
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.is_meta
    x = tokens()
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert not fused_calls
