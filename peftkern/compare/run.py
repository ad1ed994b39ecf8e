"""`peftkern compare` end to end: data, model, every method, and the report files."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import peftkern
from peftkern.benchmarking.harness import machine_description
from peftkern.compare import data, methods, plots, report
from peftkern.compare.batches import encode
from peftkern.compare.model import (
    DEFAULT_MODEL_NAME,
    check_checkpoint,
    default_model_path,
    load_model,
    load_tokenizer,
)
from peftkern.compare.study import SWEEP_FACTORS, Grid, check_grid, measure, summarize
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
    grid: Grid = Grid()
    command: str = ""  # how the run was asked for, recorded in the JSON


@dataclass
class Comparison:
    document: dict  # what compare.json holds
    files: list[Path]


def _task(config: CompareConfig) -> tuple[data.Task, list[int]]:
    """The task, and the training-set sizes: prefixes of its training split, so a smaller set
    is part of every larger one and all sizes share the validation and test splits. The
    built-in generator makes as many training examples as the largest size asks for."""
    sizes = sorted(set(config.grid.train_sizes)) if config.grid.train_sizes else None
    if config.data:
        task = data.load_jsonl(config.data, seed=config.train.seed)
        if sizes and sizes[-1] > len(task.train):
            raise UsageError(
                f"--train-sizes: {sizes[-1]} is more than the {len(task.train)} training records of {config.data}"
            )
    else:
        task = data.reviews(train=sizes[-1]) if sizes else data.reviews()
    return task, sizes or [len(task.train)]


def run(config: CompareConfig) -> Comparison:
    """Fine-tunes a fresh copy of the model for every (method, size, learning rate, seed) of
    the grid and writes compare.json (rewritten after every method and size, so an interrupted
    run keeps what it measured), compare.csv and the plots to `config.out`."""
    check_grid(config.grid)
    task, sizes = _task(config)
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
    held_out = {s: encode(task.split(s), task.kind, tokenizer, config.max_length) for s in data.SPLITS[1:]}
    model_name = Path(model_path).name if config.model else DEFAULT_MODEL_NAME
    split_sizes = f"{','.join(map(str, sizes))}/{len(task.validation)}/{len(task.test)}"
    title = (
        f"{model_name} on {task.name} ({task.kind}, train/val/test {split_sizes}); "
        f"{machine_description(device)}; torch {torch.__version__}; peftkern {peftkern.__version__}"
    )
    document = {
        "title": title,
        "command": config.command,
        "date": datetime.date.today().isoformat(),
        "model": model_path,
        "model_name": model_name,
        "task": task.name,
        "kind": task.kind,
        "labels": task.labels,
        "split_sizes": {"train": sizes, "validation": len(task.validation), "test": len(task.test)},
        "device": str(device),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "peftkern": peftkern.__version__,
        "config": {
            "max_length": config.max_length,
            **asdict(config.train),
            "train_sizes": sizes,
            "seeds": config.grid.seeds,
            "lr_mode": config.grid.lr_mode,
            "lr_sweep_factors": list(SWEEP_FACTORS) if config.grid.lr_mode == "sweep" else None,
        },
        "complete": False,
        "results": [],
        "runs": [],
    }
    json_path = out / "compare.json"
    for method in chosen:
        for size in sizes:
            splits = {"train": encode(task.train[:size], task.kind, tokenizer, config.max_length), **held_out}

            def train_once(lr: float, seed: int) -> MethodResult:
                # The same seed for every method: the same head initialisation and batch order.
                torch.manual_seed(seed)
                loaded = load_model(model_path, task, tokenizer.pad_token_id)
                train = replace(config.train, seed=seed)
                return train_method(method, loaded.model, loaded.head, splits, task.kind, train, device, lr)

            kept, made = measure(method.lr, config.grid, config.train.seed, train_once)
            document["results"].append(summarize(kept))
            document["runs"] += [asdict(r) for r in made]
            report.write_json(document, json_path)
    document["complete"] = True
    report.write_json(document, json_path)
    files = [out / "compare.csv", json_path]
    report.write_csv(document["results"], files[0])
    files += plots.write_plots(document, out)
    return Comparison(document, files)
