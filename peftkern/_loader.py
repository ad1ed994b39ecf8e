"""Loads the compiled extension, refusing a binary built against another torch."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

REBUILD_HINT = (
    "install a peftkern build made for the installed torch, or rebuild it from source against that torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall ."
)


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def load_extension() -> ModuleType:
    try:
        meta = importlib.import_module("peftkern._build_meta")
    except ImportError:
        raise ImportError(f"peftkern's native extension has not been built; {REBUILD_HINT}") from None
    installed = torch.__version__.split("+")[0]
    # The C++ ABI of torch changes between minor releases: a binary built against another
    # one fails with undefined symbols, or worse. Say so in words before loading it.
    if _major_minor(installed) != _major_minor(meta.TORCH_VERSION):
        raise ImportError(
            f"peftkern {meta.VERSION} was built against torch {meta.TORCH_VERSION}, "
            f"but torch {installed} is installed; {REBUILD_HINT}"
        )
    if meta.CUDA and torch.version.cuda is None:
        raise ImportError(
            f"peftkern {meta.VERSION} was built with CUDA kernels, but the installed torch "
            f"{torch.__version__} is a CPU-only build; install a CUDA torch or {REBUILD_HINT}"
        )
    try:
        return importlib.import_module("peftkern._C")
    except ImportError as error:
        raise ImportError(f"peftkern's native extension failed to load ({error}); {REBUILD_HINT}") from error
