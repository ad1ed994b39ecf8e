"""use_peftkern_loss: transformers causal LMs (and peft models of them) compute the same loss
and gradients through the fused linear + cross-entropy, with logits None when labels are given."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import QUIET_CPU_TRAINING, peft_lora
from peft import PrefixTuningConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import peftkern

VOCAB = 101
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    if name == "gemma2":
        # A small final softcap so that it changes the loss measurably.
        config = Gemma2Config(**DECODER, head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager")
        return Gemma2ForCausalLM(config)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gemma": (GemmaConfig, GemmaForCausalLM),
    }[name]
    extra = {"head_dim": 8} if name == "gemma" else {}
    return model_cls(config_cls(**DECODER, **extra))


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def loss_and_grads(model: torch.nn.Module, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (GPT-2 trains with dropout) in both models
    out = model(**batch(), **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_training_signal(ref: torch.nn.Module, patched: torch.nn.Module, **kwargs) -> None:
    expected, expected_grads = loss_and_grads(ref, **kwargs)
    got, got_grads = loss_and_grads(patched, **kwargs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2"])
def test_causal_lm_loss_and_gradients_match_the_model(name):
    ref = tiny(name).train()
    patched = peftkern.use_peftkern_loss(copy.deepcopy(ref))
    assert_same_training_signal(ref, patched)
    # num_items_in_batch (Trainer's gradient accumulation): a sum divided by it.
    assert_same_training_signal(ref, patched, num_items_in_batch=torch.tensor(37))


def test_without_labels_the_logits_are_returned():
    ref = tiny("llama").eval()
    patched = peftkern.use_peftkern_loss(copy.deepcopy(ref))
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    torch.testing.assert_close(patched(**inputs).logits, ref(**inputs).logits)


def test_restore_loss_gives_back_the_models_forward():
    model = tiny("llama")
    original = model.forward
    peftkern.use_peftkern_loss(model)
    peftkern.use_peftkern_loss(model)  # twice is once
    assert model(**batch()).logits is None
    peftkern.restore_loss(model)
    assert model.forward == original
    assert model(**batch()).logits.shape == (2, 11, VOCAB)


def test_peft_lora_model():
    ref = peft_lora(tiny("llama"), ("q_proj", "v_proj"), task_type="CAUSAL_LM").train()
    patched = peftkern.use_peftkern_loss(copy.deepcopy(ref))
    assert_same_training_signal(ref, patched)


def test_peft_prefix_tuning_model():
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ref = get_peft_model(tiny("llama"), config).train()
    patched = peftkern.use_peftkern_loss(copy.deepcopy(ref))
    assert_same_training_signal(ref, patched)


def test_a_head_that_is_not_a_linear_is_refused_in_words():
    model = tiny("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="output head to be an nn.Linear"):
        peftkern.use_peftkern_loss(model)


def test_trainer_step_matches_the_unpatched_model(tmp_path):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    ref = tiny("llama")
    patched = peftkern.use_peftkern_loss(copy.deepcopy(ref))
    losses = {}
    for name, model in (("eager", ref), ("peftkern", patched)):
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,  # Trainer passes num_items_in_batch
            learning_rate=1e-2,
            **QUIET_CPU_TRAINING,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses["eager"]) == 2
    torch.testing.assert_close(
        torch.tensor(losses["peftkern"]), torch.tensor(losses["eager"]), rtol=0, atol=2e-4
    )
    trained, expected = dict(patched.named_parameters()), dict(ref.named_parameters())
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
