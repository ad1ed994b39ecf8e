"""Builds the CUDA kernels of csrc/cuda/kernels/ against the CPU emulation (csrc/emulation/).

The extension is compiled on the first use and cached under build/ (ninja rebuilds it when a
source or header changes). With PEFTKERN_EMULATION_ASAN=1 it is built with AddressSanitizer,
which the process must have preloaded (tests/test_emulated_cuda_asan.py does both).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
ASAN_ENV = "PEFTKERN_EMULATION_ASAN"
SOURCES = [
    "csrc/emulation/emulated_kernels.cpp",
    "csrc/emulation/emulator_checks.cpp",
    "csrc/emulation/cuda_emulation.cpp",
]
# -O1: the kernels run thousands of fiber switches per block, but compile time matters more.
# -ffp-contract=off: no fused multiply-adds, so that the kernels' arithmetic is the one the
# tests replay with PyTorch ops (nvcc contracts by default: the GPU differs in the last bits).
FLAGS = ["-O1", "-ffp-contract=off", "-Wno-unknown-pragmas"]
ASAN_FLAGS = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]


def asan_enabled() -> bool:
    return os.environ.get(ASAN_ENV) == "1"


@functools.cache
def emulated_kernels() -> ModuleType:
    """The extension module: one function per kernel, named after it (see emulated_kernels.cpp)."""
    asan = asan_enabled()
    name = "peftkern_emulated_cuda_asan" if asan else "peftkern_emulated_cuda"
    build_dir = ROOT / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if asan:
        # libasan is already loaded in this process; the compiler and linker that the build
        # starts must not have it preloaded too.
        os.environ.pop("LD_PRELOAD", None)
    return cpp_extension.load(
        name,
        sources=[str(ROOT / source) for source in SOURCES],
        extra_cflags=FLAGS + (ASAN_FLAGS if asan else []),
        extra_ldflags=["-fsanitize=address"] if asan else [],
        build_directory=str(build_dir),
    )
