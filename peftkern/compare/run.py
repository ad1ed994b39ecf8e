"""`peftkern compare` end to end: data, model, every method, and the report files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import peftkern
from peftkern.benchmarking.harness import machine_description
from peftkern.compare import data, methods, report
from peftkern.compare.batches import encode
from peftkern.compare.model import (
    DEFAULT_MODEL_NAME,
    check_checkpoint,
    default_model_path,
    load_model,
    load_tokenizer,
)
from peftkern.compare.train import MethodResult, TrainConfig, train_method
from peftkern.errors import UsageError


@dataclass(frozen=True)
class CompareConfig:
    model: str | None = None  # a local transformers checkpoint; None: the packaged MiniLM
    data: str | None = None  # a JSONL file; None: the built-in reviews task
    methods: list[str] = field(default_factory=list)  # empty: every available method
    out: str = "peftkern-compare"
    max_length: int = 40
    device: str | None = None  # None: cuda when present, else cpu
    train: TrainConfig = TrainConfig()


@dataclass
class Comparison:
    title: str
    results: list[MethodResult]
    files: list[Path]


def run(config: CompareConfig) -> Comparison:
    """Fine-tunes a fresh copy of the model with each method and writes
    compare.csv, compare.json and compare.png (when matplotlib is there) to `config.out`."""
    task = data.load_jsonl(config.data, seed=config.train.seed) if config.data else data.reviews()
    chosen = methods.select(config.methods, task.kind)  # before any slow loading
    if not chosen:
        raise UsageError(f"no method available for a {task.kind} task")
    model_path = config.model or default_model_path()
    check_checkpoint(model_path)
    try:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UsageError(f"bad device {config.device!r}: {str(error).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {config.device!r}: this machine has no usable CUDA GPU")
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the output directory {out}: {error.strerror}") from None

    tokenizer = load_tokenizer(model_path)
    splits = {s: encode(task.split(s), task.kind, tokenizer, config.max_length) for s in data.SPLITS}
    results = []
    for method in chosen:
        # The same seed for every method: the same head initialisation and batch order.
        torch.manual_seed(config.train.seed)
        loaded = load_model(model_path, task, tokenizer.pad_token_id)
        results.append(
            train_method(method, loaded.model, loaded.head, splits, task.kind, config.train, device)
        )
        del loaded  # before the next copy is loaded, so that two never coexist

    sizes = "/".join(str(len(task.split(s))) for s in data.SPLITS)
    model_name = Path(model_path).name if config.model else DEFAULT_MODEL_NAME
    title = (
        f"{model_name} on {task.name} ({task.kind}, train/val/test {sizes}); "
        f"{machine_description(device)}; torch {torch.__version__}; peftkern {peftkern.__version__}"
    )
    files = [out / "compare.csv", out / "compare.json"]
    report.write_csv(results, files[0])
    report.write_json(
        results,
        files[1],
        {
            "title": title,
            "model": model_path,
            "task": task.name,
            "kind": task.kind,
            "labels": task.labels,
            "split_sizes": dict(zip(data.SPLITS, map(int, sizes.split("/")))),
            "device": str(device),
            "config": {"max_length": config.max_length, **asdict(config.train)},
        },
    )
    if report.write_plot(results, out / "compare.png", f"{model_name} on {task.name}"):
        files.append(out / "compare.png")
    return Comparison(title, results, files)
