"""Tiny transformers models and helpers to compare peftkern LoRA with the `peft` library, and
to build a tiny Llama with each peftkern method injected."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build models from configs; never download

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import peftkern

VOCAB = 97


# The Trainer / SFTConfig arguments every training test shares: on the CPU, a loss logged each
# step, no reporting, checkpoints or progress bar, a fixed seed.
QUIET_CPU_TRAINING = dict(
    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


# Every peftkern method on a tiny Llama, for tests that must hold for each of them alike.
INJECT: dict[str, Callable[..., object]] = {
    "lora": partial(peftkern.inject_lora, target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8),
    "houlsby": partial(peftkern.inject_adapters, config="houlsby"),
    "pfeiffer": partial(peftkern.inject_adapters, config="pfeiffer"),
    "prefix": partial(peftkern.inject_prefix, num_virtual_tokens=4),
    "prefix-mlp": partial(peftkern.inject_prefix, num_virtual_tokens=4, projection_hidden=16),
}


def tiny_llama_with(method: str, std: float = 0.1, seed: int = 11, **options: object) -> LlamaForCausalLM:
    """A tiny Llama in training mode with `method` (a key of INJECT, called with `options` too)
    injected and every trainable parameter shifted by seeded N(0, std²) noise: zero lora_B, zero
    adapter biases and near-identity adapters would make some gradients vanish or trivial. Two
    calls build equal models (an inject_prefix model cannot be deep-copied: its pre-hook closes
    over the original)."""
    model = tiny_llama()
    INJECT[method](model, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype), alpha=std)
    return model.train()


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_lora(
    base: nn.Module, target_modules, r: int = 4, lora_alpha: float = 8, lora_dropout: float = 0.0, **kwargs
):
    """A `peft` LoRA model on a copy of `base`, with lora_B made non-zero (as after training)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules), **kwargs
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def lora_factors(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """LoRA factors (or their grads) keyed `<module path>.lora_A|lora_B` for a peft or an
    injected model alike, so the two can be compared key by key."""
    return {
        common_key(name): p.grad if grads else p.detach()
        for name, p in model.named_parameters()
        if "lora_" in name
    }


def common_key(name: str) -> str:
    """A parameter name without peft's wrapping (``base_model.model.`` and ``.default.weight``):
    a peft model and an injected one name the same LoRA factor alike."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


def injected_like(base: nn.Module, peft_model: nn.Module, target_modules, **kwargs) -> nn.Module:
    """A peftkern-injected copy of `base` holding the same LoRA weights as `peft_model`."""
    model = copy.deepcopy(base)
    peftkern.inject_lora(model, target_modules=target_modules, **kwargs)
    source = lora_factors(peft_model)
    with torch.no_grad():
        for key, p in lora_factors(model).items():
            p.copy_(source[key])
    return model


def assert_same_lora_grads(a: nn.Module, b: nn.Module, **tol) -> None:
    ga, gb = lora_factors(a, grads=True), lora_factors(b, grads=True)
    assert ga.keys() == gb.keys() and ga
    for key in ga:
        torch.testing.assert_close(ga[key], gb[key], msg=lambda m: f"{key}: {m}", **tol)


class LinearHost(nn.Module):
    """One linear layer named `proj`: the smallest model peft and inject_lora both accept."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def assert_same_dropout_distribution(model: nn.Module, ref: nn.Module, draws: int = 3000) -> None:
    """peftkern's dropout (Philox from a seed) and peft's (torch's mask) never agree mask by
    mask; their output distributions must. Inverted dropout keeps the mean at the no-dropout
    output, and the variance depends on p only. Both models are in training mode. Seeded, so
    deterministic; the bounds leave room for other seeds too (each row of x is one independent
    mask, the outputs of a row are correlated), while a wrong p (0.35 for 0.3) moves the
    variance by 25%."""
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    with torch.no_grad():
        ours = torch.stack([model(x) for _ in range(draws)])
        theirs = torch.stack([ref(x) for _ in range(draws)])
        exact = ref.eval()(x)
    sem = theirs.std(0) / draws**0.5
    assert ((ours.mean(0) - exact).abs() <= 5 * sem + 1e-6).all()
    assert ((theirs.mean(0) - exact).abs() <= 5 * sem + 1e-6).all()
    ratio = (ours.var(0) / theirs.var(0)).mean().item()
    assert 0.9 < ratio < 1.1, f"variance ratio {ratio}"
    with torch.no_grad():  # in eval mode dropout is off, in peft and in peftkern alike
        torch.testing.assert_close(model.eval()(x), exact)
