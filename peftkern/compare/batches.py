"""Records to tensors, and tensors to batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from peftkern.compare.data import TaskKind

IGNORE = -100  # label of tokens that carry no loss (prompt and padding), as in transformers


def encode(records: list[dict], kind: TaskKind, tokenizer, max_length: int) -> dict[str, Tensor]:
    """input_ids, attention_mask and labels for one split. Every row is padded to the longest
    row of the split (at most `max_length`), so every step has the same shape and the time
    per step compares methods, not batch lengths."""
    if kind == "classification":
        enc = tokenizer(
            [r["text"] for r in records],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([r["label"] for r in records]),
        }
    rows = [_prompt_completion(tokenizer, r["prompt"], r["completion"], max_length) for r in records]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _prompt_completion(
    tokenizer, prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Tokens of bos + prompt + completion + eos; labels only on completion and eos, since
    the model is to learn to answer, not to predict the prompt. Too long a row loses the
    start of its prompt first (the end is what the completion follows), then its tail."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = (tokenizer(completion, add_special_tokens=False)["input_ids"] + tail)[: max_length - len(head) - 1]
    p = p[max(0, len(head) + len(p) + len(c) - max_length) :]
    ids = head + p + c
    return ids, [IGNORE] * (len(head) + len(p)) + c


def iterate(
    tensors: dict[str, Tensor], batch_size: int, generator: torch.Generator | None = None
) -> Iterator[dict[str, Tensor]]:
    """Batches in order, or shuffled by `generator` (so the seed fixes the order)."""
    n = len(tensors["labels"])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield {k: v[index] for k, v in tensors.items()}
