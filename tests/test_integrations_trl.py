"""TRL's SFTTrainer with a patched peft model trains exactly as with peft's own forward.

A few steps of `trl.SFTTrainer` on a prompt/completion dataset (TRL masks the prompt tokens:
completion-only loss) with peftkern patched in, against the same run unpatched: the loss of
every step and every trainable parameter after every step agree to fp32 precision (fp32 and
plain SGD; under SFTConfig's default bf16 autocast, within the project's low-precision rule).
Covered are the two ways a user combines them: a `peft_config` given to SFTTrainer with
``patch_peft(trainer.model)`` before ``train()`` (LoRA, DoRA), and a PeftModel patched before
it is handed to SFTTrainer (prefix tuning); and use_peftkern_loss on top of TRL's own fused LM
head. Tiny random Llama, word-level tokenizer built in memory, CPU, nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch
from lora_models import QUIET_CPU_TRAINING, VOCAB, tiny_llama

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl, or the `test` extra)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL depends on it)")

from peft import LoraConfig, PrefixTuningConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

import peftkern  # noqa: E402
from peftkern.integrations import peft_patch, peft_patch_prefix  # noqa: E402

STEPS = 4
LR = 1.0
SPECIALS = ("<pad>", "<eos>", "<unk>")

# A patched layer or model that hands a call back to peft warns "peftkern: a patched ..."; here
# every call must run peftkern's ops, so such a warning fails the test.
pytestmark = pytest.mark.filterwarnings("error:peftkern. a patched")


def lora_config(use_dora: bool = False) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w0`` … ``w{VOCAB - 4}`` and the special tokens, one id each, split on spaces."""
    words = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    vocab = {token: i for i, token in enumerate([*words, *SPECIALS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def prompt_completion_dataset(n: int = 8) -> datasets.Dataset:
    """Prompts and completions of different lengths (the batches are padded), where the
    completion continues the prompt's arithmetic sequence, so the loss falls."""
    rows = []
    for i in range(n):
        step, prompt_len, completion_len = i % 3 + 1, 3 + i % 4, 2 + i % 3
        seq = [f"w{(i + step * j) % (VOCAB - len(SPECIALS))}" for j in range(prompt_len + completion_len)]
        rows.append({"prompt": " ".join(seq[:prompt_len]), "completion": " " + " ".join(seq[prompt_len:])})
    return datasets.Dataset.from_list(rows)


class RecordSteps(TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


class LossRecordingSFTTrainer(trl.SFTTrainer):
    """SFTTrainer that keeps each step's loss unrounded (its logs round to 4 digits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(loss.detach().item())
        return loss


def sft_run(
    tmp_path,
    name: str,
    model,
    peft_config=None,
    patch_trainer_model: bool = False,
    fused_loss: bool = False,
    checkpointing: bool = True,
    bf16: bool = False,
):
    """Trains STEPS steps, after ``patch_peft(trainer.model)`` and ``use_peftkern_loss`` when
    asked; returns the trainer, the trainable parameters before training and after every step
    (its per-step losses are `trainer.losses`)."""
    args = trl.SFTConfig(
        output_dir=str(tmp_path / name),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        # Plain SGD: Adam's first steps divide each gradient by its own magnitude, so a component
        # near Adam's eps (the random tiny model has some) would turn a 1e-10 rounding difference
        # into a visible weight difference; SGD keeps the comparison at fp32 precision.
        optim="sgd",
        bf16=bf16,  # SFTConfig's default is True (bf16 autocast); the step-by-step comparison is in fp32
        gradient_checkpointing=checkpointing,  # SFTConfig's default is True
        learning_rate=LR,
        **QUIET_CPU_TRAINING,
    )
    record = RecordSteps()
    torch.manual_seed(0)  # get_peft_model draws lora_A inside SFTTrainer.__init__
    trainer = LossRecordingSFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(),
        processing_class=word_tokenizer(),
        peft_config=peft_config,
        callbacks=[record],
    )
    trainer.losses = []
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if patch_trainer_model:
        report = peftkern.patch_peft(trainer.model)
        assert report.num_patched > 0 and report.num_skipped == 0, str(report)
    if fused_loss:
        peftkern.use_peftkern_loss(trainer.model)
    trainer.train()
    return trainer, initial, record.params


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    function = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def assert_completion_only(trainer) -> None:
    """TRL trained on the completions only: every prompt token (and, batched, the padding) is
    labelled -100, every completion token (and the EOS TRL appends) by itself."""
    examples = list(trainer.train_dataset)
    for example in examples:
        prompt_len = len(example["prompt"].split())
        ids, labels = example["input_ids"], example["labels"]
        assert labels == [-100] * prompt_len + ids[prompt_len:], example
    batch = trainer.data_collator(examples[:2])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["attention_mask"] == 0).any()  # the two examples differ in length


def assert_same_training(patched, reference) -> None:
    (trainer, initial, params), (ref_trainer, ref_initial, ref_params) = patched, reference
    assert_completion_only(trainer)
    assert_completion_only(ref_trainer)
    assert initial.keys() == ref_initial.keys()
    for key in initial:
        torch.testing.assert_close(initial[key], ref_initial[key], rtol=0, atol=0)
    assert len(trainer.losses) == len(ref_trainer.losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(trainer.losses), torch.tensor(ref_trainer.losses), rtol=1e-5, atol=1e-6
    )
    assert trainer.losses[-1] < trainer.losses[0]
    assert len(params) == len(ref_params) == STEPS
    for step, (got, expected) in enumerate(zip(params, ref_params, strict=True)):
        assert got.keys() == expected.keys()
        for key in expected:
            where = f"after step {step + 1}, {key}"
            torch.testing.assert_close(
                got[key], expected[key], rtol=1e-4, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
            )
    assert all(not torch.equal(params[-1][k], initial[k]) for k in initial)  # training moved every parameter


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_sft_trainer_with_peft_config_and_patched_model_matches_peft(tmp_path, monkeypatch, use_dora):
    reference = sft_run(tmp_path, "peft", tiny_llama(), peft_config=lora_config(use_dora))
    fused = count_calls(monkeypatch, peft_patch, "dora_linear" if use_dora else "lora_linear")
    patched = sft_run(
        tmp_path, "patched", tiny_llama(), peft_config=lora_config(use_dora), patch_trainer_model=True
    )
    # 4 layers, twice a step: SFTConfig turns gradient checkpointing on, which recomputes the
    # forward during backward.
    assert patched[0].args.gradient_checkpointing
    assert fused[0] == 2 * 4 * STEPS
    assert_same_training(patched, reference)


def test_sft_trainer_with_patched_prefix_tuning_model_matches_peft(tmp_path, monkeypatch):
    def prefix_model():
        torch.manual_seed(0)
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        return get_peft_model(tiny_llama(), config)

    # peft's prefix tuning cannot train with SFTConfig's default gradient checkpointing
    # (transformers drops the prefix cache under checkpointing, leaving the widened attention mask
    # one prefix too long), so the reference trains without it; the patched model passes the
    # prefix as rows, not as a cache, and trains with it.
    reference = sft_run(tmp_path, "peft", prefix_model(), checkpointing=False)
    prefix_calls = count_calls(monkeypatch, peft_patch_prefix, "attend_with_prefix")
    model = prefix_model()
    assert peftkern.patch_peft(model).num_patched == 2
    patched = sft_run(tmp_path, "patched", model)
    assert prefix_calls[0] == 2 * 2 * STEPS  # 2 layers, forward and its recomputation
    assert_same_training(patched, reference)


def test_sft_trainer_with_use_peftkern_loss_trains_through_trls_own_fused_head(tmp_path):
    """SFTTrainer replaces the model's forward with TRL's chunked LM head and calls it with
    ``fused_lm_head=True``; use_peftkern_loss applied on top (after the trainer was built)
    hands such calls to it, so training runs and equals the plain run."""

    reference = sft_run(tmp_path, "peft", tiny_llama(), peft_config=lora_config())
    patched = sft_run(
        tmp_path,
        "patched",
        tiny_llama(),
        peft_config=lora_config(),
        patch_trainer_model=True,
        fused_loss=True,
    )
    assert_same_training(patched, reference)


def test_sft_trainer_bf16_autocast_patched_lora_is_as_close_to_fp32_as_peft(tmp_path):
    """SFTConfig's defaults train under bf16 autocast (on the CPU too). Patched, every step's
    loss and parameters are at most twice as far from the fp32 run as peft's own bf16 run is
    (the project's low-precision rule; the floors are far below bf16's resolution)."""

    def run(name: str, **options):
        return sft_run(tmp_path, name, tiny_llama(), peft_config=lora_config(), **options)

    (exact, _, exact_params), (peft_bf16, _, peft_params) = run("fp32"), run("peft", bf16=True)
    patched, _, patched_params = run("patched", bf16=True, patch_trainer_model=True)
    assert patched.args.bf16 and patched.args.gradient_checkpointing
    loss = torch.tensor(exact.losses)
    peft_error = (torch.tensor(peft_bf16.losses) - loss).abs()
    assert (peft_error > 0).any()  # autocast did run in bf16
    assert ((torch.tensor(patched.losses) - loss).abs() <= 2 * peft_error + 1e-4).all()
    for step, expected in enumerate(exact_params):
        for key, value in expected.items():
            peft_error = (peft_params[step][key] - value).abs().max()
            patched_error = (patched_params[step][key] - value).abs().max()
            assert patched_error <= 2 * peft_error + 1e-5, f"after step {step + 1}, {key}"
