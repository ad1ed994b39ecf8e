"""`peftkern bench` end to end on tiny shapes, its result files, and its errors."""

from __future__ import annotations

import csv
import json

import pytest

from peftkern.benchmarking.harness import MODES
from peftkern.cli import main


def test_bench_quick_prints_the_table_and_writes_csv_json_png(tmp_path, capsys):
    files = {ext: tmp_path / f"bench.{ext}" for ext in ("csv", "json", "png")}
    assert (
        main(
            [
                "bench",
                "--quick",
                "--rounds",
                "2",
                "--no-compile",
                "--ops",
                "lora_linear",
                "--csv",
                str(files["csv"]),
                "--json",
                str(files["json"]),
                "--plot",
                str(files["png"]),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "x floor" in out and "saved MiB" in out and "machine:" in out

    document = json.loads(files["json"].read_text())
    assert document["command"] and len(document["date"]) == 10
    rows = document["results"]
    providers = {r["provider"] for r in rows}
    assert {"frozen-linear", "peftkern", "eager"} <= providers
    assert {r["mode"] for r in rows} == set(MODES)
    assert len(rows) == len(providers) * len(MODES)
    for r in rows:
        assert r["median_ms"] > 0 and r["saved_bytes"] >= 0 and r["extra"]["op"] == "lora_linear"
        if r["provider"] == "frozen-linear":
            assert r["ratio_to_floor"] == pytest.approx(1.0)
    with open(files["csv"]) as f:
        assert [r["provider"] for r in csv.DictReader(f)] == [r["provider"] for r in rows]
    assert files["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pytest.importorskip("matplotlib.image").imread(files["png"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--ops", "lora_linear,flash"], "unknown benchmark 'flash'"),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_bad_bench_arguments_give_one_line(capsys, argv, expected):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
