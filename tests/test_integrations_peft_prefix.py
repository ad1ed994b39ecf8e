"""patch_peft on a `peft` prefix-tuning model: the prefix runs through peftkern's prefix
attention instead of a KV cache; same numbers, same parameters, same files as peft."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lora_models import VOCAB, tiny_llama, tokens
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peft_prefix_helpers import LAYERS, TIGHT, M, assert_same_step, padding_mask, peft_prefix
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peftkern
from peftkern.integrations import peft_patch_prefix

DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny(family: str, **overrides):
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    return model_cls(config_cls(**{**DECODER, **extra, **overrides})).eval()


def run(model, x, mask=None, **kwargs):
    """(logits, loss, {parameter name: grad}) of one training step's forward and backward."""
    model.zero_grad()
    out = model(input_ids=x, attention_mask=mask, labels=x, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "prefix_projection"])
def test_patched_equals_peft_logits_loss_and_prefix_grads(projection, prefix_calls):
    ref = peft_prefix(tiny_llama(), projection).train()
    model = copy.deepcopy(ref)
    keys_before = list(model.state_dict())
    params_before = [name for name, p in model.named_parameters() if p.requires_grad]
    report = peftkern.patch_peft(model)
    assert report.num_patched == LAYERS and report.num_skipped == 0
    assert report.patched == [f"base_model.model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert f"patched {LAYERS} prefix-attention layers, skipped 0" in str(report)
    assert list(model.state_dict()) == keys_before
    assert [name for name, p in model.named_parameters() if p.requires_grad] == params_before
    expected_params = 1 if not projection else 5  # embedding (+ transform.0/2 weight and bias)
    assert len(params_before) == expected_params

    x = tokens(batch=3, seq=9)
    with torch.no_grad():  # the prefix matters: equality below is not equality of two no-ops
        assert not torch.allclose(ref(input_ids=x).logits, ref.get_base_model()(x).logits, atol=1e-2)
    for mask in (None, padding_mask(x)):
        prefix_calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = run(model, x, mask)
        assert not [w for w in caught if "peftkern" in str(w.message)]
        assert prefix_calls == list(range(LAYERS))  # once per layer: the fused path ran
        assert_same_step(ours, run(ref, x, mask), **TIGHT)

    # inputs_embeds and explicit position_ids go through the same path (peft shifts positions by m)
    embeds = ref.get_base_model().get_input_embeddings()(x).detach()
    positions = torch.arange(9).unsqueeze(0) + 2
    with torch.no_grad():
        torch.testing.assert_close(
            model(inputs_embeds=embeds, position_ids=positions).logits,
            ref(inputs_embeds=embeds, position_ids=positions).logits,
            **TIGHT,
        )


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_covered_families(family, prefix_calls):
    ref = peft_prefix(tiny(family), projection=True).train()
    model = copy.deepcopy(ref)
    assert peftkern.patch_peft(model).num_patched == LAYERS
    x = tokens(batch=3, seq=9)
    assert_same_step(run(model, x, padding_mask(x)), run(ref, x, padding_mask(x)), **TIGHT)
    assert prefix_calls == list(range(LAYERS))


def test_gradient_checkpointing_recomputes_with_the_prefix():
    """Checkpointed layers get the rows again in the recomputation (they travel as a keyword
    argument). peft itself cannot run this: transformers drops the cache in checkpointed layers."""
    ref = peft_prefix(tiny_llama(), projection=True).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    model.get_base_model().gradient_checkpointing_enable()
    x = tokens(batch=3, seq=9)
    assert_same_step(run(model, x, padding_mask(x)), run(ref, x, padding_mask(x)), **TIGHT)


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "prefix_projection"])
def test_save_pretrained_of_patched_model_loads_into_plain_peft(tmp_path, projection):
    base = tiny_llama()
    ref = peft_prefix(base, projection)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    saved = load_file(tmp_path / "patched/adapter_model.safetensors")
    expected = load_file(tmp_path / "ref/adapter_model.safetensors")
    assert saved.keys() == expected.keys() == {"prompt_embeddings"}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert (tmp_path / "patched/adapter_config.json").read_text() == (
        tmp_path / "ref/adapter_config.json"
    ).read_text()

    loaded = PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "patched"
    )  # plain peft, inference mode
    assert "forward" not in loaded.__dict__
    x = tokens(batch=3, seq=9)
    mask = padding_mask(x)
    with torch.no_grad():
        expected_logits = loaded(input_ids=x, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, expected_logits, **TIGHT)
        # and a loaded (inference-mode) model patches too: its prefix is the stored table
        assert peftkern.patch_peft(loaded).num_patched == LAYERS
        torch.testing.assert_close(loaded(input_ids=x, attention_mask=mask).logits, expected_logits, **TIGHT)


def test_unpatch_restores_peft_exactly(prefix_calls):
    ref = peft_prefix(tiny_llama())
    model = copy.deepcopy(ref)
    base_config = model.get_base_model().config.to_dict()
    dict_keys = set(model.__dict__)
    report = peftkern.patch_peft(model)
    assert model.get_base_model().config._attn_implementation == peft_patch_prefix.ATTENTION_NAME
    again = peftkern.patch_peft(model)  # idempotent
    assert again.patched == report.patched and again.num_skipped == 0
    assert peftkern.unpatch_peft(model) == LAYERS
    assert peftkern.unpatch_peft(model) == 0
    assert set(model.__dict__) == dict_keys
    assert model.get_base_model().config.to_dict() == base_config
    assert model.get_base_model().config._attn_implementation == "sdpa"
    x = tokens(batch=3, seq=9)
    prefix_calls.clear()
    with torch.no_grad():
        out, expected = (
            model(input_ids=x, attention_mask=padding_mask(x)),
            ref(input_ids=x, attention_mask=padding_mask(x)),
        )
    assert not prefix_calls
    assert torch.equal(out.logits, expected.logits)
    assert out.cache.get_seq_length() == M + 9  # peft's cache again


def test_calls_it_does_not_cover_run_peft(prefix_calls):
    """A requested cache, attention weights, generation and a disabled adapter: peft's own
    computation (warned about where the patched forward hands over), never a wrong answer."""
    ref = peft_prefix(tiny_llama())
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=2, seq=6)
    with torch.no_grad():
        for kwargs in ({"use_cache": True}, {"output_attentions": True}):
            prefix_calls.clear()
            with pytest.warns(UserWarning, match="runs peft's forward"):
                out = model(input_ids=x, **kwargs)
            expected = ref(input_ids=x, **kwargs)
            assert not prefix_calls
            assert torch.equal(out.logits, expected.logits)

        prefix_calls.clear()
        generated = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False
        )
        assert torch.equal(
            generated,
            ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False),
        )
        assert not prefix_calls

        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, ref.get_base_model()(x).logits)
        assert not prefix_calls
        model(input_ids=x)  # the patched forward is back after the context
        assert prefix_calls == list(range(LAYERS))


def test_attention_dropout_in_training_runs_peft(prefix_calls):
    ref = peft_prefix(tiny("llama", attention_dropout=0.2)).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=2, seq=6)
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="attention dropout"):
        ours = run(model, x)
    torch.manual_seed(7)
    assert_same_step(ours, run(ref, x), rtol=0, atol=0)
    assert not prefix_calls
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # no dropout in eval: the fused path
    assert prefix_calls == list(range(LAYERS))


def _two_adapters():
    model = peft_prefix(tiny_llama())
    model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    return model


# Other model types and soft-capped or bidirectional attention: test_integrations_peft_prefix_models.
SKIPPED = {
    "eager": (
        lambda: peft_prefix(tiny("llama", attn_implementation="eager")),
        "attention implementation 'eager'",
    ),
    "two-adapters": (_two_adapters, "2 adapters"),
    "prompt-tuning": (
        lambda: get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M)),
        "peft type PROMPT_TUNING",
    ),
    "seq-cls": (
        lambda: get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=M)),
        "PeftModelForSequenceClassification",
    ),
}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_models_it_does_not_cover_are_skipped_with_the_reason(case, prefix_calls):
    build, reason = SKIPPED[case]
    ref = build()
    model = copy.deepcopy(ref)
    implementation = model.get_base_model().config._attn_implementation
    report = peftkern.patch_peft(model)
    assert report.num_patched == 0 and list(report.skipped) == ["prompt_encoder.default"]
    assert reason in report.skipped["prompt_encoder.default"], report.skipped
    assert "skipped 1" in str(report)
    assert "forward" not in model.__dict__
    assert model.get_base_model().config._attn_implementation == implementation
    x = tokens(batch=2, seq=6)

    def outcome(m):  # peft's own result, or its own error (peft refuses SEQ_CLS prefix tuning of Llama)
        try:
            with torch.no_grad():
                return m(input_ids=x).logits
        except ValueError as exc:
            return str(exc)

    ours, theirs = outcome(model), outcome(ref)
    if isinstance(theirs, str):
        assert ours == theirs
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not prefix_calls
    assert peftkern.unpatch_peft(model) == 0


def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "trip", [_pickled, _saved_and_loaded, copy.deepcopy], ids=["pickle", "torch.save", "deepcopy"]
)
def test_whole_patched_model_round_trips_still_patched(trip, prefix_calls):
    ref = peft_prefix(tiny_llama())
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    loaded = trip(model)
    assert peft_patch_prefix.is_patched(loaded) and loaded.forward.module is loaded
    x = tokens(batch=3, seq=9)
    mask = padding_mask(x)
    with torch.no_grad():
        ours, expected = (m(input_ids=x, attention_mask=mask).logits for m in (loaded, ref))
    torch.testing.assert_close(ours, expected, **TIGHT)
    assert prefix_calls == list(range(LAYERS))
    assert peftkern.unpatch_peft(loaded) == LAYERS
    assert loaded.get_base_model().config._attn_implementation == "sdpa"
    assert peft_patch_prefix.is_patched(model)  # the original is untouched


LOAD_IN_A_NEW_PROCESS = """
import sys, torch
from peftkern.integrations import peft_patch_prefix
model = torch.load(sys.argv[1], weights_only=False)
assert peft_patch_prefix.is_patched(model)
x, mask = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=x, attention_mask=mask).logits, sys.argv[3])
"""


def test_saved_patched_model_runs_in_a_new_process(tmp_path):
    """A new process has not registered peftkern's attention with transformers; loading the
    patched model does it."""
    ref = peft_prefix(tiny_llama())
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=3, seq=9)
    mask = padding_mask(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, mask), tmp_path / "inputs.pt")
    root = Path(peftkern.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    paths = [str(tmp_path / name) for name in ("model.pt", "inputs.pt", "logits.pt")]
    subprocess.run([sys.executable, "-c", LOAD_IN_A_NEW_PROCESS, *paths], check=True, env=env, timeout=300)
    with torch.no_grad():
        expected = ref(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, **TIGHT)
