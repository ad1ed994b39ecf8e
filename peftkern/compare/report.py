"""The comparison as text: the table of every (method, size) record, the source's table (one
row per dimension the source compares methods on, one column per method), and CSV/JSON files.
Everything here reads the JSON document `peftkern compare` writes, so the command's report and
scripts/render_compare_table.py (README's table) show the same numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

README_MARKS = "<!-- compare-table:start -->", "<!-- compare-table:end -->"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _epochs(record: dict) -> str:
    """Per seed: epochs run, the best epoch in brackets, * when stopped early."""
    return " ".join(
        f"{n}({best}){'*' if early else ''}"
        for n, best, early in zip(record["epochs"], record["best_epoch"], record["stopped_early"])
    )


def format_records(document: dict) -> str:
    """One row per (method, train size)."""
    header = (
        f"{'method':<11} {'n':>5} {'trainable':>9} {'share':>8} {'lr':>7} {'ms/step':>8} "
        f"{'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7} "
        f"{'train':>6} {'val':>6} {'test (± std)':>14} {'gap':>6}  epochs (best)"
    )
    lines = [document["title"], header, "-" * len(header)]
    for r in document["results"]:
        m = r["peak_memory_mib"]
        lines.append(
            f"{r['method']:<11} {r['train_size']:>5} {_count(r['trainable']):>9} {r['share']:7.3f}% "
            f"{r['lr']:7.0e} {r['ms_per_step']:8.1f} {m['parameters']:7.1f} {m['gradients']:7.1f} "
            f"{m['optimizer']:7.1f} {m['activations']:7.1f} {m['total']:7.1f} {r['train_acc']:6.3f} "
            f"{r['val_acc']:6.3f} {r['test_acc_mean']:7.3f} ± {r['test_acc_std']:.3f} "
            f"{r['train_val_gap']['accuracy']:6.3f}  {_epochs(r)}"
        )
    total = "sum of the parts" if document["device"] == "cpu" else "the allocator's peak"
    lines.append(
        "memory: peak MiB of parameters, gradients, optimizer state and activations saved for backward; "
        f"total: {total}. ms/step: median training step. Accuracy of the best epoch (lowest validation "
        "loss), mean over seeds; gap: train - validation accuracy; * stopped early."
    )
    return "\n".join(lines)


def source_table(document: dict) -> tuple[list[str], list[list[str]]]:
    """The source's comparison, measured: (header, rows). Parameters and compute at the largest
    training set, adaptation as test accuracy there, overfitting risk as the train-validation
    gap at the smallest."""
    results = document["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    sizes = sorted({r["train_size"] for r in results})
    at = {(r["method"], r["train_size"]): r for r in results}
    large = [at[m, sizes[-1]] for m in methods]
    small = [at[m, sizes[0]] for m in methods]
    seeds = document["config"]["seeds"]

    def row(label: str, cells: list[str]) -> list[str]:
        return [label, *cells]

    rows = [
        row("parameters updated", [f"{r['share']:.3g}% ({_count(r['trainable'])})" for r in large]),
        row("compute: time per step", [f"{r['ms_per_step']:.0f} ms" for r in large]),
        row("compute: peak memory", [f"{r['peak_memory_mib']['total']:.0f} MiB" for r in large]),
        row(
            "… of it gradients + optimizer state",
            [
                f"{r['peak_memory_mib']['gradients'] + r['peak_memory_mib']['optimizer']:.1f} MiB"
                for r in large
            ],
        ),
        row("… of it activations", [f"{r['peak_memory_mib']['activations']:.1f} MiB" for r in large]),
        row(
            f"adaptation: test accuracy at n={sizes[-1]}",
            [f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}" for r in large],
        ),
        row(
            f"overfitting risk: train − val gap at n={sizes[0]} (accuracy / loss)",
            [f"{r['train_val_gap']['accuracy']:+.3f} / {r['train_val_gap']['loss']:+.3f}" for r in small],
        ),
        row(
            f"stopped early (of {seeds} seed{'s' * (seeds > 1)}), n={'/'.join(map(str, sizes))}",
            ["/".join(str(sum(at[m, n]["stopped_early"])) for n in sizes) for m in methods],
        ),
    ]
    return ["", *methods], rows


def format_source_table(document: dict) -> str:
    """The source's table as fixed-width text."""
    header, rows = source_table(document)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_source_table(document: dict, source: str | None = None) -> str:
    """The source's table as markdown, with a line saying where the numbers come from."""
    header, rows = source_table(document)
    config = document["config"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(line) + " |" for line in rows),
        "",
        f"{document['model_name']} on {document['task']}, training sets of "
        f"{', '.join(map(str, config['train_sizes']))} examples, {config['seeds']} seed(s), "
        f"lr {config['lr_mode']}, at most {config['epochs']} epochs (patience {config['patience']}); "
        f"{document['machine']}, torch {document['torch']}, peftkern {document['peftkern']}, {document['date']}"
        + (f" (`{document['command']}`)" if document.get("command") else "")
        + (f"; file `{source}`" if source else "")
        + ".",
    ]
    return "\n".join(lines)


def replace_between_marks(text: str, body: str, marks: tuple[str, str] = README_MARKS) -> str:
    start, end = marks
    if start not in text or end not in text:
        raise ValueError(f"the markers {start} and {end} are not both there")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def _flat(record: dict) -> dict:
    """A CSV row: nested parts as `outer.inner`, per-seed lists space-separated."""
    row = {}
    for key, value in record.items():
        if isinstance(value, dict):
            row.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            row[key] = " ".join(str(v) for v in value)
        else:
            row[key] = value
    return row


def write_csv(records: list[dict], path: Path) -> None:
    rows = [_flat(r) for r in records]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_json(document: dict, path: Path) -> None:
    """Written to a temporary file and renamed, so the file is never half written."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=2))
    partial.replace(path)
