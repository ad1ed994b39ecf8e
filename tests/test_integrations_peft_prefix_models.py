"""patch_peft on peft prefix-tuning models of GPT-2, OPT, GPT-J, Gemma, Gemma 2 and Gemma 3:
the families that run the prefix attention equal unpatched peft (logits at real positions,
loss, every gradient; padded, train and eval), and the ones it cannot express stay on peft's
path, reported as skipped, with peft's own numbers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lora_models import VOCAB, tokens
from peft import PrefixTuningConfig, get_peft_model
from peft_prefix_helpers import LAYERS, TIGHT, M, assert_same_step, padding_mask, peft_prefix
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import peftkern

# Tiny configs, no dropout anywhere (a train-mode comparison then needs no shared RNG), unusual
# choices where a family has them: biases, no scaling, per-layer scaling, partial rotary,
# grouped-query attention, a query_pre_attn_scalar other than head_dim.
_GEMMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
_GPT = dict(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64)
_NO_DROPOUT_GPT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
CONFIGS = {
    "gpt2": lambda **kw: GPT2LMHeadModel(GPT2Config(**{**_GPT, **_NO_DROPOUT_GPT, **kw})),
    "gpt2-scaled-by-layer": lambda **kw: GPT2LMHeadModel(
        GPT2Config(**_GPT, **_NO_DROPOUT_GPT, scale_attn_by_inverse_layer_idx=True, **kw)
    ),
    "gpt2-unscaled": lambda **kw: GPT2LMHeadModel(
        GPT2Config(**_GPT, **_NO_DROPOUT_GPT, scale_attn_weights=False, **kw)
    ),
    "opt": lambda **kw: OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            dropout=0.0,
            **kw,
        )
    ),
    "gptj": lambda **kw: GPTJForCausalLM(GPTJConfig(**_GPT, **_NO_DROPOUT_GPT, rotary_dim=4, **kw)),
    "gemma": lambda **kw: GemmaForCausalLM(GemmaConfig(**_GEMMA, **kw)),
    "gemma3": lambda **kw: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **{
                **_GEMMA,
                "query_pre_attn_scalar": 12,
                "sliding_window": 32,
                "layer_types": ["sliding_attention", "full_attention"],
                **kw,
            }
        )
    ),
}


# The GPT-2 scaling variants change one number per layer: the unfrozen-base test covers them.
FAMILIES = [name for name in CONFIGS if not name.startswith("gpt2-")]


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return CONFIGS[name](**overrides).eval()


def step(model, x, mask):
    """(logits at real positions, loss, {parameter: grad}) of one forward and backward, the loss
    over real tokens only (labels -100 at padding) as a training loop would set it."""
    model.zero_grad()
    labels = x if mask is None else x.masked_fill(mask == 0, -100)
    out = model(input_ids=x, attention_mask=mask, labels=labels)
    out.loss.backward()
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach()[real], out.loss.detach(), grads


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "prefix_projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_peft(family, projection, mode, prefix_calls):
    ref = peft_prefix(tiny(family), projection).train(mode == "train")
    model = copy.deepcopy(ref)
    report = peftkern.patch_peft(model)
    assert report.num_patched == LAYERS and report.num_skipped == 0, report.skipped
    assert [model.get_submodule(name).layer_idx for name in report.patched] == list(range(LAYERS))
    x = tokens(batch=3, seq=9)
    with torch.no_grad():  # the prefix matters: equality below is not equality of two no-ops
        assert not torch.allclose(ref(input_ids=x).logits, ref.get_base_model()(x).logits, atol=1e-2)
    for mask in (None, padding_mask(x)):  # unpadded; right- and left-padded rows
        prefix_calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = step(model, x, mask)
        assert not [w for w in caught if "peftkern" in str(w.message)]
        assert prefix_calls == list(range(LAYERS))  # every layer ran the prefix attention
        assert_same_step(ours, step(ref, x, mask), **TIGHT)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_gradients_of_an_unfrozen_base_model(family, prefix_calls):
    """Every base parameter trainable too: their gradients pass through the prefix attention's
    gradients with respect to q, k and v, and through each family's projections and rotary."""
    ref = peft_prefix(tiny(family)).train()
    ref.get_base_model().requires_grad_(True)
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=3, seq=9)
    ours, theirs = step(model, x, padding_mask(x)), step(ref, x, padding_mask(x))
    assert len(ours[2]) > 10  # the prefix and the whole base model
    assert_same_step(ours, theirs, **TIGHT)
    assert prefix_calls == list(range(LAYERS))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_with_the_prefix(family, prefix_calls):
    """The rows reach checkpointed layers' recomputation too (a keyword argument every family's
    decoder layer hands to its attention)."""
    ref = peft_prefix(tiny(family), projection=True).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    model.get_base_model().gradient_checkpointing_enable()
    x = tokens(batch=3, seq=9)
    assert_same_step(step(model, x, padding_mask(x)), step(ref, x, padding_mask(x)), **TIGHT)
    assert prefix_calls == [*range(LAYERS), *reversed(range(LAYERS))]  # forward; backward recomputes


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_and_disabled_adapter_stay_peft(family, prefix_calls):
    """Calls without the rows (generate, disable_adapter) run the family's attention through
    the SDPA fallback with SDPA's masks: peft's generated tokens, the base model's logits."""
    ref = peft_prefix(tiny(family))
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=2, seq=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding, as generation batches are padded
    with torch.no_grad():
        kwargs = dict(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(**kwargs), ref.generate(**kwargs))
        with model.disable_adapter():
            ours = model(input_ids=x, attention_mask=mask).logits
        torch.testing.assert_close(ours, ref.get_base_model()(input_ids=x, attention_mask=mask).logits)
    assert not prefix_calls


def test_opt_positions_follow_the_padding(prefix_calls):
    """OPT counts positions over the attention mask (left padding shifts them) where the others
    count from the cache length; explicit position_ids are shifted by m, as peft does."""
    ref = peft_prefix(tiny("opt"))
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=3, seq=9)
    mask = padding_mask(x)
    positions = torch.arange(9).unsqueeze(0).expand(3, -1) + 1
    with torch.no_grad():
        for kwargs in ({}, {"position_ids": positions}):
            real = mask.bool()
            ours = model(input_ids=x, attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(
                ours, ref(input_ids=x, attention_mask=mask, **kwargs).logits[real], **TIGHT
            )
    assert len(prefix_calls) == 2 * LAYERS


WINDOWED = {
    "gemma3": lambda: tiny("gemma3", sliding_window=16),  # layers: sliding, full
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(**{**_GEMMA, "head_dim": None, "sliding_window": 16})
    ).eval(),
}


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sliding_window_runs_fused_while_the_prefix_fits(family, prefix_calls):
    """m + n <= window: the window hides nothing and the call runs the prefix attention.
    Longer: the window would hide prefix rows, which the op cannot, so the call runs peft's
    forward (with a warning) and gives peft's numbers."""
    torch.manual_seed(0)
    ref = peft_prefix(WINDOWED[family]()).train()
    model = copy.deepcopy(ref)
    assert peftkern.patch_peft(model).num_patched == LAYERS
    fits = tokens(batch=3, seq=16 - M)
    assert_same_step(step(model, fits, padding_mask(fits)), step(ref, fits, padding_mask(fits)), **TIGHT)
    assert prefix_calls == list(range(LAYERS))

    prefix_calls.clear()
    too_long = tokens(batch=3, seq=17 - M)
    with pytest.warns(UserWarning, match="exceed the sliding window 16"):
        ours = step(model, too_long, padding_mask(too_long))
    assert not prefix_calls
    assert_same_step(ours, step(ref, too_long, padding_mask(too_long)), rtol=0, atol=0)


def test_gpt2_attention_dropout_in_training_runs_peft(prefix_calls):
    """GPT-2 keeps its attention dropout in attn_pdrop (0.1 in its released configs)."""
    ref = peft_prefix(tiny("gpt2", attn_pdrop=0.1)).train()
    model = copy.deepcopy(ref)
    peftkern.patch_peft(model)
    x = tokens(batch=2, seq=6)
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="attention dropout 0.1"):
        ours = step(model, x, None)
    torch.manual_seed(7)
    assert_same_step(ours, step(ref, x, None), rtol=0, atol=0)
    assert not prefix_calls
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    assert prefix_calls == list(range(LAYERS))


def _gemma2(**overrides):
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**_GEMMA, **overrides)).eval()


LEFT_TO_PEFT = {
    # Every released Gemma 2 soft-caps its attention logits; the op has no soft-capping.
    "gemma2": (lambda: _gemma2(), "soft-capping (attn_logit_softcapping=50.0)"),
    # Without it, Gemma 2 still runs eager attention only (transformers has no SDPA for it), and
    # the prefix path takes over from SDPA: no family entry.
    "gemma2-no-softcap": (lambda: _gemma2(attn_logit_softcapping=None), "model type 'gemma2'"),
    "gemma3-softcap": (lambda: tiny("gemma3", attn_logit_softcapping=20.0), "soft-capping"),
    "gemma3-bidirectional": (
        lambda: tiny("gemma3", use_bidirectional_attention=True),
        "bidirectional attention",
    ),
    "gpt-neox": (
        lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ).eval(),
        "model type 'gpt_neox'",
    ),
}


@pytest.mark.parametrize("case", list(LEFT_TO_PEFT))
def test_models_left_on_peft_path_are_reported_and_unchanged(case, prefix_calls):
    build, reason = LEFT_TO_PEFT[case]
    ref = peft_prefix(build())
    model = copy.deepcopy(ref)
    implementation = model.get_base_model().config._attn_implementation
    report = peftkern.patch_peft(model)
    assert report.num_patched == 0 and list(report.skipped) == ["prompt_encoder.default"]
    assert reason in report.skipped["prompt_encoder.default"], report.skipped
    assert "forward" not in model.__dict__
    assert model.get_base_model().config._attn_implementation == implementation
    x = tokens(batch=3, seq=9)
    mask = padding_mask(x)
    assert_same_step(step(model.train(), x, mask), step(ref.train(), x, mask), rtol=0, atol=0)
    assert not prefix_calls


def test_patching_keeps_peft_trainable_parameters():
    """Patching changes no parameter's trainability: peft's prefix table stays the only one."""
    for family in FAMILIES:
        model = get_peft_model(tiny(family), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M))
        before = [name for name, p in model.named_parameters() if p.requires_grad]
        peftkern.patch_peft(model)
        assert [name for name, p in model.named_parameters() if p.requires_grad] == before
        assert before == ["prompt_encoder.default.embedding.weight"]
