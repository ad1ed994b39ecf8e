"""`peftkern compare` as a study: training-set sizes, seeds, the learning-rate sweep, the
measured memory split, early stopping, the JSON schema, the source's table and the README
renderer; on a tiny random BERT saved to disk."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from compare_checkpoints import save_tiny_checkpoint

from peftkern.cli import main
from peftkern.compare import data, methods, report
from peftkern.compare.study import STUDY, SWEEP_FACTORS, Grid
from peftkern.compare.train import EarlyStopping, TrainConfig
from peftkern.errors import UsageError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

RECORD_FIELDS = {
    "method",
    "train_size",
    "lr",
    "trainable",
    "share",
    "ms_per_step",
    "peak_memory_mib",
    "train_acc",
    "val_acc",
    "test_acc_mean",
    "test_acc_std",
    "train_val_gap",
    "epochs",
    "best_epoch",
    "stopped_early",
}
MEMORY_PARTS = {"parameters", "gradients", "optimizer", "activations", "total"}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-bert"),
        transformers.BertModel,
        transformers.BertConfig,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )


@pytest.fixture(scope="module")
def study(tiny_bert, tmp_path_factory) -> dict:
    """Two sizes, two seeds, the sweep; full fine-tuning at a rate that diverges (so early
    stopping must act), LoRA and head-only at theirs."""
    out = tmp_path_factory.mktemp("study")
    task = data.reviews(train=16, validation=8, test=8)
    records = [{**r, "split": s} for s in data.SPLITS for r in task.split(s)]
    (out / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    diverging = dataclasses.replace(methods.METHODS["full"], lr=3.0)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(methods.METHODS, "full", diverging)
        # Tiny matrices: one thread is faster, and immune to other work on the machine.
        torch.set_num_threads(1)
        argv = ["compare", "--model", tiny_bert, "--data", str(out / "reviews.jsonl"), "--max-length", "16"]
        argv += ["--methods", "head-only,lora,full", "--train-sizes", "16,8", "--seeds", "2", "--lr", "sweep"]
        argv += ["--epochs", "4", "--patience", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]
        try:
            assert main(argv) == 0
        finally:
            torch.set_num_threads(threads)
    return {"out": out, "json": json.loads((out / "compare.json").read_text())}


def test_early_stopping_rule_on_a_loss_sequence():
    stopping = EarlyStopping(patience=2)
    improved = [stopping.update(loss) for loss in (1.0, 0.8, 0.9, 0.8, 0.7)]
    assert improved == [True, True, False, False, True]  # equal is not better
    assert stopping.best_epoch == 5 and not stopping.should_stop

    def stop_epoch(losses: list[float], patience: int) -> tuple[int, int]:
        """(epoch training stops after, best epoch), fed epoch by epoch as training does."""
        stopping = EarlyStopping(patience)
        for loss in losses:
            stopping.update(loss)
            if stopping.should_stop:
                break
        return stopping.epoch, stopping.best_epoch

    assert stop_epoch([1.0, 0.8, 0.9, 0.85, 0.5], patience=2) == (4, 2)  # 0.5 is never seen
    assert stop_epoch([1.0, 0.8, 0.9, 0.85, 0.5], patience=3) == (5, 5)
    assert stop_epoch([1.0, 1.1, 0.9, 1.0, 1.2, 1.3], patience=2) == (5, 3)

    stopping = EarlyStopping(patience=1)
    stopping.update(math.nan)
    assert stopping.best_epoch == 0 and stopping.should_stop  # NaN never improves


def test_records_have_the_schema(study):
    document = study["json"]
    assert document["complete"] and document["config"]["train_sizes"] == [8, 16]
    assert [(r["method"], r["train_size"]) for r in document["results"]] == [
        (m, n) for m in ("head-only", "lora", "full") for n in (8, 16)
    ]
    for r in document["results"]:
        assert set(r) == RECORD_FIELDS
        assert set(r["peak_memory_mib"]) == MEMORY_PARTS and set(r["train_val_gap"]) == {"accuracy", "loss"}
        assert len(r["epochs"]) == len(r["best_epoch"]) == len(r["stopped_early"]) == 2
        assert 0 <= r["test_acc_mean"] <= 1 and r["test_acc_std"] >= 0 and r["ms_per_step"] > 0
        assert r["train_val_gap"]["accuracy"] == pytest.approx(r["train_acc"] - r["val_acc"])
    # The sweep: three rates with the first seed, then the second seed at the chosen one.
    assert len(document["runs"]) == 6 * (len(SWEEP_FACTORS) + 1)


def test_the_sweep_keeps_the_rate_of_lowest_validation_loss(study):
    document = study["json"]
    for r in document["results"]:
        first = [
            run
            for run in document["runs"]
            if (run["method"], run["train_size"], run["seed"]) == (r["method"], r["train_size"], 0)
        ]
        default = methods.METHODS[r["method"]].lr if r["method"] != "full" else 3.0
        assert [run["lr"] for run in first] == pytest.approx([default * f for f in SWEEP_FACTORS])
        assert r["lr"] == min(first, key=lambda run: run["val_loss"])["lr"]
        seeds = [run for run in document["runs"] if run["method"] == r["method"] and run["seed"] == 1]
        assert {run["lr"] for run in seeds if run["train_size"] == r["train_size"]} == {r["lr"]}


def test_memory_parts_add_up_and_match_the_parameter_counts(study):
    """fp32: gradients are 4 bytes per trainable parameter, AdamW's two moments 8 (plus one
    step counter per tensor), parameters 4 bytes per parameter of the model."""
    for run in study["json"]["runs"]:
        memory, trainable = run["memory"], run["trainable_params"]
        assert memory["parameters"] == 4 * run["total_params"]
        assert memory["gradients"] == 4 * trainable
        assert 8 * trainable < memory["optimizer"] <= 8 * trainable + 4 * 64, run["method"]
        assert memory["activations"] > 0
        assert memory["total"] == sum(memory[p] for p in MEMORY_PARTS - {"total"})
    full = next(r for r in study["json"]["results"] if r["method"] == "full")
    mib = full["peak_memory_mib"]
    assert mib["gradients"] == pytest.approx(mib["parameters"]) and mib["optimizer"] > 2 * mib["gradients"]


def test_early_stopping_stops_where_the_validation_loss_says(study):
    runs = study["json"]["runs"]
    assert any(r["stopped_early"] for r in runs if r["method"] == "full")  # lr 3 diverges
    for r in runs:
        losses = r["curve"]["val_loss"]
        assert len(losses) == r["epochs_run"] == len(r["curve"]["train_loss"])
        if r["best_epoch"]:
            assert min(losses) == losses[r["best_epoch"] - 1] == r["val_loss"]
            assert losses.index(min(losses)) == r["best_epoch"] - 1
        if r["stopped_early"]:
            assert r["epochs_run"] == r["best_epoch"] + 1 < 4  # patience 1
        else:
            assert r["epochs_run"] == 4


def test_report_ends_with_the_source_table_and_writes_the_plots(study):
    text = report.format_source_table(study["json"])
    lines = text.splitlines()
    assert lines[0].split() == ["head-only", "lora", "full"]
    labels = (
        "parameters updated",
        "compute: time per step",
        "compute: peak memory",
        "adaptation",
        "overfitting",
    )
    for label in labels:
        assert any(line.startswith(label) for line in lines), label
    assert "test accuracy at n=16" in text and "gap at n=8" in text
    for name in ("compare.png", "accuracy-vs-size.png", "loss-curves.png"):
        assert (study["out"] / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    header = (study["out"] / "compare.csv").read_text().splitlines()[0].split(",")
    assert "peak_memory_mib.gradients" in header and "train_val_gap.loss" in header


def _render_script():
    spec = importlib.util.spec_from_file_location(
        "render_compare_table", ROOT / "scripts/render_compare_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_rendered_between_the_markers(study, tmp_path, capsys):
    readme = tmp_path / "README.md"
    start, end = report.README_MARKS
    readme.write_text(f"# title\n\n{start}\nold\n{end}\n\nrest\n")
    render = _render_script()
    assert render.main([str(study["out"] / "compare.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("# title\n") and text.endswith(f"{end}\n\nrest\n")
    table = text.split(start)[1].split(end)[0]
    assert "|  | head-only | lora | full |" in table and "| overfitting risk" in table
    readme.write_text("no markers")
    assert render.main([str(study["out"] / "compare.json"), "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err
    old_schema = tmp_path / "old.json"
    old_schema.write_text(json.dumps({"title": "t", "results": [{"method": "lora", "test_accuracy": 0.9}]}))
    assert render.main([str(old_schema), "--readme", str(readme)]) == 2
    assert "not a result file of this peftkern compare" in capsys.readouterr().err


def _captured_config(monkeypatch, argv: list[str]):
    """The CompareConfig the command builds, without running it."""
    import peftkern.compare.run

    seen = []

    def fake_run(config):
        seen.append(config)
        raise UsageError("stop")

    monkeypatch.setattr(peftkern.compare.run, "run", fake_run)
    assert main(["compare", *argv]) == 2
    return seen[0]


def test_default_run_is_unchanged_and_study_sets_the_preset(monkeypatch):
    default = _captured_config(monkeypatch, [])
    assert default.grid == Grid() and default.train == TrainConfig()
    study = _captured_config(monkeypatch, ["--study"])
    assert study.grid == STUDY.grid and study.grid.lr_mode == "sweep" and study.grid.seeds == 3
    assert len(study.grid.train_sizes) == 3 and study.methods == []  # every method
    assert (study.train.epochs, study.train.patience) == (STUDY.epochs, STUDY.patience)
    assert study.command == "peftkern compare --study"
    mixed = _captured_config(monkeypatch, ["--study", "--seeds", "2", "--epochs", "5"])
    assert mixed.grid.seeds == 2 and mixed.train.epochs == 5 and mixed.grid.lr_mode == "sweep"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--train-sizes", "64,0"], "--train-sizes: every size must be at least 1, got 0"),
        (["--train-sizes", "64,many"], "--train-sizes takes whole numbers"),
        (["--train-sizes", ","], "--train-sizes needs at least one size"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--lr", "fast"], "unknown --lr mode 'fast'; known: default, sweep"),
    ],
)
def test_bad_study_values_give_one_line(capsys, argv, expected):
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


def test_more_train_records_than_the_file_has_gives_one_line(tiny_bert, tmp_path, capsys):
    records = [{"text": f"example {i}", "label": i % 2} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["compare", "--model", tiny_bert, "--data", str(path), "--train-sizes", "8,17"]) == 2
    assert "17 is more than the 16 training records" in capsys.readouterr().err


def test_help_states_the_study_preset(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sizes = ",".join(map(str, STUDY.grid.train_sizes))
    assert f"sizes {sizes}, {STUDY.grid.seeds} seeds" in text
    assert f"{STUDY.epochs} epochs, patience {STUDY.patience}" in text
