"""Writes the source's comparison table, measured, into README.md from a `peftkern compare`
result file:

    python scripts/render_compare_table.py benchmarks/results/DIR/compare.json [--readme README.md]

The table goes between the markers `<!-- compare-table:start -->` and
`<!-- compare-table:end -->`; the rows are those `peftkern compare` prints at the end of its
report (peftkern.compare.report.source_table). Numbers are never typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's peftkern, installed or not

from peftkern.compare.report import markdown_source_table, replace_between_marks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a compare.json written by peftkern compare")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    if not document.get("complete", True):
        print(f"{args.results} is from a run that did not finish; rendering what it holds", file=sys.stderr)
    try:
        source = str(args.results.resolve().relative_to(ROOT))
    except ValueError:
        source = str(args.results)
    try:
        table = markdown_source_table(document, source)
    except (KeyError, TypeError) as error:
        print(
            f"{args.results}: not a result file of this peftkern compare (no field {error})", file=sys.stderr
        )
        return 2
    try:
        text = replace_between_marks(args.readme.read_text(), table)
    except ValueError as error:
        print(f"{args.readme}: {error}", file=sys.stderr)
        return 2
    args.readme.write_text(text)
    print(f"wrote the compare table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
