"""Supervised fine-tuning of one method, measured.

Cross-entropy (on the class, or on the completion tokens of a causal LM), AdamW with weight
decay on matrices only, linear warm-up then cosine decay to zero, an evaluation on the
validation split after every epoch, early stopping when the validation loss has not improved
for `patience` epochs, and the trainable parameters of the best epoch restored before the
train and test splits are scored. One seed fixes the head's initialisation, dropout and batch
order.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkern.compare.batches import IGNORE, iterate
from peftkern.compare.data import TaskKind
from peftkern.compare.memory import MemoryMeter, PeakMemory
from peftkern.compare.methods import Method
from peftkern.integrations.loss import use_peftkern_loss


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimiser steps, even mid-epoch
    batch_size: int = 16
    patience: int = 2
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = True


@dataclass
class Curve:
    """Per epoch: the mean training loss of its steps, and the validation loss and accuracy."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@dataclass
class MethodResult:
    """One training run: one method, learning rate, seed and training-set size. Losses and
    accuracies are those of the best epoch (lowest validation loss), whose weights are restored
    before the train and test splits are scored."""

    method: str
    lr: float
    seed: int
    train_size: int
    trainable_params: int
    total_params: int
    trainable_pct: float
    steps: int
    step_ms: float
    memory: PeakMemory
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    test_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    curve: Curve


class EarlyStopping:
    """Stop when the validation loss has not improved for `patience` epochs in a row; the
    best epoch is the one with the lowest loss (the first of equals; NaN never improves)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.epoch, self.best_epoch, self.best_loss = patience, 0, 0, math.inf

    def update(self, val_loss: float) -> bool:
        """Records one epoch's validation loss; True when it is the best so far."""
        self.epoch += 1
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, self.epoch
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.epoch - self.best_epoch >= self.patience


def loss_and_hits(model: nn.Module, batch: dict[str, Tensor], kind: TaskKind) -> tuple[Tensor, int, int]:
    """Mean loss, number of correct predictions and number of predictions of one batch.
    A causal LM is scored on its completion tokens (teacher forced), a classifier on classes."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if kind == "causal-lm":
        # The logits at position t predict token t+1.
        logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    scored = labels != IGNORE
    hits = int((logits.argmax(-1)[scored] == labels[scored]).sum())
    return loss, hits, int(scored.sum())


def training_loss(model: nn.Module, batch: dict[str, Tensor], kind: TaskKind) -> Tensor:
    """The mean loss of one training batch. A causal LM (patched by use_peftkern_loss) computes it
    with peftkern's fused linear + cross-entropy: the same mean over completion tokens as
    `loss_and_hits`, without the [batch, seq, vocab] logits."""
    if kind == "causal-lm":
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    return loss_and_hits(model, batch, kind)[0]


@torch.no_grad()
def evaluate(
    model: nn.Module, data: dict[str, Tensor], kind: TaskKind, batch_size: int
) -> tuple[float, float]:
    """(mean loss per prediction, accuracy) over a split, in eval mode."""
    model.eval()
    total_loss, hits, count = 0.0, 0, 0
    for batch in iterate(data, batch_size * 2):
        loss, h, n = loss_and_hits(model, batch, kind)
        total_loss += loss.item() * n
        hits, count = hits + h, count + n
    model.train()
    return total_loss / count, hits / count


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay on weight matrices only: decaying biases and LayerNorm gains only hurts.
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class _Progress:
    """tqdm when it is installed, else one rewritten line on stderr."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.enabled, self.total, self.label, self.done = enabled, total, label, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(
                total=total, desc=label, unit="step", leave=False, disable=not enabled, file=sys.stderr
            )

    def update(self, note: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update()
        elif self.enabled:
            print(
                f"\r{self.label}: {self.done}/{self.total} steps {note}", end="", file=sys.stderr, flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def train_method(
    method: Method,
    model: nn.Module,
    head: list[str],
    splits: dict[str, dict[str, Tensor]],
    kind: TaskKind,
    config: TrainConfig,
    device: torch.device,
    lr: float | None = None,
) -> MethodResult:
    """Applies `method` to `model` (which it changes), trains at `lr` (default: the method's),
    and measures it."""
    lr = method.lr if lr is None else lr
    torch.manual_seed(config.seed)
    model.requires_grad_(False)
    method.apply(model)
    for name, param in model.named_parameters():
        if name in head:
            param.requires_grad_(True)
    model.to(device).train()
    splits = {name: {k: v.to(device) for k, v in data.items()} for name, data in splits.items()}

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for _, p in trainable)
    train_size = len(splits["train"]["labels"])
    steps_per_epoch = math.ceil(train_size / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = _optimizer(trainable, lr, config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, config.warmup_fraction)
    )

    if kind == "causal-lm":
        use_peftkern_loss(model)  # evaluation passes no labels and still gets logits
    meter = MemoryMeter(model, optimizer, device)
    generator = torch.Generator().manual_seed(config.seed)
    progress = _Progress(
        total_steps, f"{method.name} n={train_size} seed={config.seed} lr={lr:.0e}", config.progress
    )
    step_times: list[float] = []
    stopping = EarlyStopping(config.patience)
    curve = Curve()
    best_state = {n: p.detach().clone() for n, p in trainable}
    stopped_early, step = False, 0
    for epoch in range(1, config.epochs + 1):
        epoch_losses = []
        for batch in iterate(splits["train"], config.batch_size, generator):
            if step == total_steps:
                break
            start = time.perf_counter()
            # Shapes are the same every step, so the first step is measured.
            with meter.counting() if step == 0 else contextlib.nullcontext():
                loss = training_loss(model, batch, kind)
            loss.backward()
            if step == 0:
                meter.after_backward()
            optimizer.step()
            if step == 0:
                meter.after_optimizer_step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)
            step += 1
            epoch_losses.append(loss.item())
            progress.update(f"epoch {epoch} loss {epoch_losses[-1]:.3f}")
        val_loss, val_acc = evaluate(model, splits["validation"], kind, config.batch_size)
        curve.train_loss.append(statistics.fmean(epoch_losses) if epoch_losses else math.nan)
        curve.val_loss.append(val_loss)
        curve.val_accuracy.append(val_acc)
        if stopping.update(val_loss):
            best_state = {n: p.detach().clone() for n, p in trainable}
        if step == total_steps:
            break
        if stopping.should_stop:  # only early when there was more training to do
            stopped_early = True
            break
    progress.close()

    with torch.no_grad():
        for name, param in trainable:
            param.copy_(best_state[name])
    train_loss, train_acc = evaluate(model, splits["train"], kind, config.batch_size)
    _, test_acc = evaluate(model, splits["test"], kind, config.batch_size)
    best = stopping.best_epoch
    # The first step pays for allocation and lazy initialisation; it is not typical.
    typical = step_times[1:] or step_times
    return MethodResult(
        method=method.name,
        lr=lr,
        seed=config.seed,
        train_size=train_size,
        trainable_params=n_trainable,
        total_params=total,
        trainable_pct=100.0 * n_trainable / total,
        steps=step,
        step_ms=1e3 * statistics.median(typical),
        memory=meter.result(),
        train_loss=train_loss,
        train_accuracy=train_acc,
        # Best epoch 0: no epoch had a finite validation loss; the starting weights were kept.
        val_loss=curve.val_loss[best - 1] if best else math.nan,
        val_accuracy=curve.val_accuracy[best - 1] if best else math.nan,
        test_accuracy=test_acc,
        best_epoch=best,
        epochs_run=len(curve.val_loss),
        stopped_early=stopped_early,
        curve=curve,
    )
