"""The CPU kernels are compiled once per x86 vector ISA (AVX-512, AVX2, baseline) and the best
one the CPU has is picked at run time, so a test run only exercises one of them. These tests
run the op tests again in child processes under PEFTKERN_CPU_ISA, which selects a lesser
variant: every variant is checked against the reference on any machine that runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftkern

TESTS = Path(__file__).resolve().parent
ORDER = ("avx512", "avx2", "baseline")  # from the most capable to the least
OP_TESTS = ("test_lora_linear.py", "test_bottleneck_adapter.py", "test_prefix_attention.py")


def run_python(args: list[str], isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTKERN_CPU_ISA": isa}
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600
    )


def expected_isa(requested: str) -> str:
    """What a request gives on this machine: never more than the CPU has."""
    detected = peftkern.build_info()["cpu_isa"]
    return max(requested, detected, key=ORDER.index)


@pytest.mark.parametrize("isa", ORDER)
def test_the_environment_selects_a_variant_never_above_the_cpu(isa):
    result = run_python(["-c", "import peftkern; print(peftkern.build_info()['cpu_isa'])"], isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_isa(isa)


def test_an_unknown_variant_is_refused_in_words():
    result = run_python(["-c", "import peftkern"], "avx1024")
    assert result.returncode != 0
    assert "PEFTKERN_CPU_ISA must be avx512, avx2 or baseline, got 'avx1024'" in result.stderr


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_op_tests_pass_under_a_lesser_variant(isa):
    if expected_isa(isa) != isa:
        pytest.skip(f"this CPU has no {isa} variant to select")
    result = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(TESTS / t) for t in OP_TESTS)], isa
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
