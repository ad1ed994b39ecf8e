"""Regenerates the README's benchmark tables from the result files in benchmarks/results/.

    python scripts/render_benchmark_tables.py

Each JSON file there was written by a benchmark script (`--json`) on real hardware; the table
shows, per case, every provider's time as a ratio to the floor measured in the same run, and
the saved-activation bytes. Numbers are never typed into the README by hand.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- benchmark-tables:start -->", "<!-- benchmark-tables:end -->"


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


def main() -> None:
    files = [f for f in sorted(RESULTS.glob("**/*.json")) if is_benchmark_document(f)]
    body = "\n".join(render_file(f) for f in files) if files else "No results recorded yet."
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"rendered {len(files)} result file(s) into {README.name}")


if __name__ == "__main__":
    main()
