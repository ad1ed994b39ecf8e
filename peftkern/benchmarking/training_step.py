"""One training step (forward + backward + AdamW) of a Llama-style model: the `peft` library's
LoRA (or prefix tuning) vs the same model patched with `patch_peft` vs a model injected with
`inject_lora` (`inject_prefix`); for LoRA on the CPU also the patched model with its attention
switched to peftkern's flash kernel (`use_peftkern_attention`).

All start from the same base weights, run the same batch, and are timed interleaved; ratios
are to `peft` measured in the same run (a ratio below 1 is a speed-up). `frozen-base` is the
same model without adapters (its input embeddings require grad, so backward still crosses every
layer; nothing is updated): the step no adapter method can beat, which shows how much of
`peft`'s cost is left to save. The LoRA
providers also share the LoRA weights; peft's and peftkern's prefix encoders are initialised
differently, which does not change the work a step does. Needs `transformers` and `peft`.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from peftkern.benchmarking.harness import (
    Provider,
    Result,
    dtype_name,
    make_result,
    peak_bytes,
    saved_activation_bytes,
    time_interleaved,
)
from peftkern.integrations import inject_lora, inject_prefix, patch_peft, use_peftkern_attention
from peftkern.integrations.loss import use_peftkern_loss

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StepCase:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    r: int
    dropout: float
    dtype: torch.dtype
    device: str
    targets: tuple[str, ...] = QV
    prefix: int = 0  # > 0: prefix tuning with this many virtual tokens instead of LoRA
    fused_loss: bool = False  # adds the patched model with use_peftkern_loss as a provider
    dora: bool = False  # LoRA with use_dora=True (weight-decomposed LoRA)

    @property
    def name(self) -> str:
        dt = dtype_name(self.dtype)
        if self.prefix:
            return f"step h{self.hidden} L{self.layers} {self.batch}x{self.seq} prefix m{self.prefix} {dt}"
        where = "qv" if self.targets == QV else f"{len(self.targets)}lin"
        vocab = f" V{self.vocab}" if self.fused_loss else ""
        method = "dora" if self.dora else "r"
        return (
            f"step h{self.hidden} L{self.layers} {self.batch}x{self.seq} {where} {method}{self.r}{vocab} {dt}"
        )


# The vocabulary is kept small on the CPU so the LM head (identical in every provider) does
# not drown the attention projections the providers differ in.
# LoRA on q/v is the target configuration; on every linear layer the share of the
# step that LoRA costs (and fusion can save) is larger.
CPU_CASES = [
    StepCase(512, 4, 8, 1376, 2048, 256, 4, 16, 0.05, torch.float32, "cpu", targets)
    for targets in (QV, ALL_LINEAR)
]
CPU_CASES.append(StepCase(512, 4, 8, 1376, 2048, 256, 4, 16, 0.05, torch.float32, "cpu", QV, dora=True))
CPU_CASES.append(StepCase(512, 4, 8, 1376, 2048, 256, 4, 0, 0.0, torch.float32, "cpu", prefix=20))
# A real 32k vocabulary, where the LM head and its loss are a large share of the step: the
# case for use_peftkern_loss.
CPU_CASES.append(StepCase(512, 4, 8, 1376, 32_000, 256, 4, 16, 0.05, torch.float32, "cpu", fused_loss=True))
GPU_CASES = [StepCase(4096, 8, 32, 11008, 32000, 2048, 1, 16, 0.05, torch.bfloat16, "cuda", fused_loss=True)]


def base_model(case: StepCase) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.heads,
        max_position_embeddings=case.seq,
        use_cache=False,  # training: no KV cache
    )
    return LlamaForCausalLM(config).to(device=case.device, dtype=case.dtype)


def build_models(case: StepCase) -> dict[str, nn.Module]:
    return build_prefix_models(case) if case.prefix else build_lora_models(case)


def fully_patched(peft_model: nn.Module) -> nn.Module:
    patched = copy.deepcopy(peft_model)
    report = patch_peft(patched)
    if (
        report.num_skipped or not report.num_patched
    ):  # a partly patched model would make the comparison meaningless
        raise RuntimeError(f"peftkern: the benchmark model was not fully patched:\n{report}")
    return patched


def frozen_base(base: nn.Module) -> nn.Module:
    """The floor of any adapter method: a copy of the base model with every weight frozen
    whose input embeddings require grad, so backward still runs through every layer (as it
    must to reach an adapter in the first one) while nothing else is computed or updated."""
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    return frozen.train()


def build_prefix_models(case: StepCase) -> dict[str, nn.Module]:
    """peft prefix tuning, the same model patched by peftkern, and inject_prefix."""
    from peft import PrefixTuningConfig, get_peft_model

    base = base_model(case)
    floor = frozen_base(base)
    peft_model = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.prefix)
    )
    patched = fully_patched(peft_model)
    inject_prefix(base, num_virtual_tokens=case.prefix)
    return {
        "peft": peft_model.train(),
        "peftkern-patched": patched.train(),
        "peftkern-injected": base.train(),
        "frozen-base": floor,
    }


def build_lora_models(case: StepCase) -> dict[str, nn.Module]:
    """peft, peft patched by peftkern, and peftkern-injected: same weights everywhere."""
    from peft import LoraConfig, get_peft_model

    base = base_model(case)
    floor = frozen_base(base)
    lora = LoraConfig(
        r=case.r,
        lora_alpha=2 * case.r,
        lora_dropout=case.dropout,
        target_modules=list(case.targets),
        use_dora=case.dora,
    )
    peft_model = get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():  # trained-like B, so the adapters do work in every provider
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    patched = fully_patched(peft_model)
    injected = base
    inject_lora(
        injected,
        case.targets,
        r=case.r,
        lora_alpha=2 * case.r,
        lora_dropout=case.dropout,
        use_dora=case.dora,
    )
    source = {
        n.removeprefix("base_model.model.")
        .replace(".default.weight", "")
        .replace("lora_magnitude_vector", "magnitude"): p
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    with torch.no_grad():
        for name, p in injected.named_parameters():
            if p.requires_grad:
                p.copy_(source[name])
    # On a bf16 model peft keeps its adapters in fp32 while inject_lora gives them the base
    # dtype: the injected provider then does slightly less work than the other two.
    models = {
        "peft": peft_model.train(),
        "peftkern-patched": patched.train(),
        "peftkern-injected": injected.train(),
    }
    if case.device == "cpu":  # on a GPU every attention call would go to SDPA anyway
        with_attention = copy.deepcopy(patched)
        use_peftkern_attention(with_attention)
        models["peftkern-patched+attention"] = with_attention.train()
    if case.fused_loss:
        models["peftkern-patched+loss"] = use_peftkern_loss(copy.deepcopy(patched)).train()
    models["frozen-base"] = floor
    return models


def training_step(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None  # none: frozen-base

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run(case: StepCase, *, rounds: int = 10, warmup: int = 2) -> list[Result]:
    device = torch.device(case.device)
    models = build_models(case)
    input_ids = torch.randint(
        0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(0)
    ).to(device)
    steps = {name: training_step(model, input_ids) for name, model in models.items()}
    times = time_interleaved(steps, device, rounds=rounds, warmup=warmup)
    floor = statistics.median(times["peft"])
    results = []
    for name, model in models.items():
        params = list(model.parameters())
        saved = saved_activation_bytes(
            Provider(name, lambda m=model: m(input_ids=input_ids, labels=input_ids).loss, params)
        )
        results.append(
            make_result(
                case.name,
                name,
                "train-step",
                times[name],
                floor,
                device,
                saved_bytes=saved,
                peak_bytes=peak_bytes(steps[name], device),
                extra={
                    "benchmark": "training_step",
                    "dtype": str(case.dtype),
                    "dropout": case.dropout,
                    "method": f"prefix m{case.prefix}" if case.prefix else "dora" if case.dora else "lora",
                    "targets": ",".join(case.targets),
                },
            )
        )
    return results


def default_cases() -> list[StepCase]:
    return GPU_CASES if torch.cuda.is_available() else CPU_CASES


def quick_cases() -> list[StepCase]:
    """A tiny Llama, LoRA on q/v and prefix tuning: checks the benchmark runs, in seconds."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [
        StepCase(32, 2, 4, 64, 128, 16, 2, 4, 0.05, torch.float32, device),
        StepCase(32, 2, 4, 64, 128, 16, 2, 0, 0.0, torch.float32, device, prefix=4),
    ]
