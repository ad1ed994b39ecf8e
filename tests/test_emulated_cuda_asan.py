"""The emulated CUDA kernels once more, built with AddressSanitizer, in a subprocess that has
libasan preloaded: any read or write out of a tensor's or a shared array's bounds is a failure,
even where it would not change a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from emulated_cuda import ASAN_ENV, ROOT

pytestmark = pytest.mark.emulated_cuda


def compiler_library(name: str) -> str | None:
    """The path of a runtime library of the C++ compiler, or None when it has none."""
    try:
        path = subprocess.run(
            ["c++", f"-print-file-name={name}"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if Path(path).is_absolute() and Path(path).exists() else None


@pytest.mark.skipif(os.environ.get(ASAN_ENV) == "1", reason="already the AddressSanitizer run")
def test_emulated_kernels_under_address_sanitizer():
    asan, libstdcxx = compiler_library("libasan.so"), compiler_library("libstdc++.so")
    if asan is None or libstdcxx is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    env = {
        **os.environ,
        ASAN_ENV: "1",
        # libstdc++ too: python does not link it, and AddressSanitizer's exception interceptor
        # needs it loaded before the extension throws (the emulator's errors are exceptions).
        "LD_PRELOAD": f"{asan} {libstdcxx}",
        # Python and torch allocate for the process lifetime; only memory errors count here.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
    }
    # Warps in one order only: the order changes which values are read, not which addresses.
    # -s: a report is written to stderr as the process dies, which pytest's capture would lose.
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider"]
    command += [str(ROOT / "tests" / "test_emulated_cuda.py"), "-k", "not reverse"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert "ERROR: AddressSanitizer" not in output, output[-6000:]
    assert result.returncode == 0, output[-6000:]
    assert " passed" in result.stdout
