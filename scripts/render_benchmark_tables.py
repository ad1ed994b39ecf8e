"""Regenerates the benchmark tables of benchmarks/README.md, and the summary in README.md, from
the result files in benchmarks/results/.

    python scripts/render_benchmark_tables.py

Each JSON file there was written by a benchmark script (`--json`) on real hardware; the table
shows, per case, every provider's time as a ratio to the floor measured in the same run, and
the saved-activation bytes. Numbers are never typed in by hand.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLES = ROOT / "benchmarks" / "README.md"
SUMMARY = ROOT / "README.md"
TABLE_MARKS = "<!-- benchmark-tables:start -->", "<!-- benchmark-tables:end -->"
SUMMARY_MARKS = "<!-- benchmark-summary:start -->", "<!-- benchmark-summary:end -->"
# The mode a case is summarised by: what a training step costs.
SUMMARY_MODES = ("forward+backward", "train-step")


def render_file(path: Path) -> str:
    document = json.loads(path.read_text())
    rows = document["results"]
    first = rows[0]
    lines = [
        f"**{first['machine']}**, torch {first['torch']}, peftkern {first['peftkern']}, {document['date']} "
        f"(`{document['command']}`, file `{path.relative_to(ROOT)}`)",
        "",
    ]
    by_case: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_case[row["case"]][row["provider"]][row["mode"]] = row
    modes = list(dict.fromkeys(row["mode"] for row in rows))  # in the order they were measured
    for case, providers in by_case.items():
        lines += [
            f"`{case}`",
            "",
            "| provider | "
            + " | ".join(f"{m} (× floor)" for m in modes)
            + f" | {modes[-1]} ms | saved activations |",
            "|---" * (len(modes) + 3) + "|",
        ]
        for provider, by_mode in providers.items():
            ratios = " | ".join(f"{by_mode[m]['ratio_to_floor']:.3f}" if m in by_mode else "-" for m in modes)
            last = by_mode.get(modes[-1])
            ms = f"{last['median_ms']:.2f}" if last else "-"
            saved = next(iter(by_mode.values()))["saved_bytes"] / 2**20
            lines.append(f"| {provider} | {ratios} | {ms} | {saved:.2f} MiB |")
        lines.append("")
    return "\n".join(lines)


def is_benchmark_document(path: Path) -> bool:
    """Harness output ({"command", "date", "results"}); other JSON (e.g. compare runs) is not."""
    document = json.loads(path.read_text())
    rows = document.get("results") if isinstance(document, dict) else None
    return isinstance(rows, list) and bool(rows) and "ratio_to_floor" in rows[0]


def summary_table(files: list[Path]) -> str:
    """One line per case: peftkern's and every other provider's forward+backward (or training
    step) time as a ratio to the case's floor, and the saved activations."""
    lines = [
        "| case (machine, date) | floor | peftkern | the others | saved MiB: floor; peftkern (others) |",
        "|---|---|---|---|---|",
    ]
    for path in files:
        document = json.loads(path.read_text())
        by_case: dict[str, list[dict]] = defaultdict(list)
        for row in document["results"]:
            if row["mode"] in SUMMARY_MODES:
                by_case[row["case"]].append(row)
        for case, rows in by_case.items():
            floor_row = next(r for r in rows if r["ratio_to_floor"] == 1.0)
            floor = floor_row["provider"]
            mine = [r for r in rows if r["provider"].startswith("peftkern")]
            if not mine:
                continue
            others = [r for r in rows if r["provider"] != floor and r not in mine]

            def listed(results: list[dict]) -> str:
                return ", ".join(f"{r['provider']} {r['ratio_to_floor']:.2f}" for r in results) or "-"

            def saved(results: list[dict]) -> str:
                return ", ".join(f"{r['saved_bytes'] / 2**20:.1f}" for r in results) or "-"

            where = f"{rows[0]['machine'].split(' (')[0]}, {document['date']}"
            lines.append(
                f"| `{case}` ({where}) | {floor} | **{listed(mine)}** | {listed(others)} "
                f"| {saved([floor_row])}; {saved(mine)} ({saved(others)}) |"
            )
    return "\n".join(lines)


def replace_between(path: Path, marks: tuple[str, str], body: str) -> None:
    start, end = marks
    head, rest = path.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main() -> None:
    files = [f for f in sorted(RESULTS.glob("**/*.json")) if is_benchmark_document(f)]
    body = "\n".join(render_file(f) for f in files) if files else "No results recorded yet."
    replace_between(TABLES, TABLE_MARKS, body)
    replace_between(SUMMARY, SUMMARY_MARKS, summary_table(files) if files else "No results recorded yet.")
    print(f"rendered {len(files)} result file(s) into {TABLES.relative_to(ROOT)} and {SUMMARY.name}")


if __name__ == "__main__":
    main()
