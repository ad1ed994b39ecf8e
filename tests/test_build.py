"""Build information, the torch-mismatch guard, and `peftkern info`."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import peftkern
from peftkern import _loader
from peftkern.cli import main


def test_build_info_describes_this_build():
    info = peftkern.build_info()
    assert info["version"] == peftkern.__version__
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["cpu_isa"] in {"avx512", "avx2", "baseline"}
    # A build without OpenMP would run every CPU kernel on one thread (ATen inlines its
    # OpenMP parallel_for into the extension), silently and without any wrong result.
    assert info["cpu_parallel"] is True
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]
    assert ("+cu" in info["version"]) == info["cuda"]


def test_import_refuses_a_binary_built_for_another_torch(monkeypatch):
    meta = importlib.import_module("peftkern._build_meta")
    monkeypatch.setattr(meta, "TORCH_VERSION", "1.99.0")
    with pytest.raises(
        ImportError,
        match=(
            r"built against torch 1\.99\.0, but torch .* is installed; "
            r"install a peftkern build made for the installed torch"
        ),
    ):
        _loader.load_extension()


def test_import_refuses_cuda_binary_under_cpu_torch(monkeypatch):
    meta = importlib.import_module("peftkern._build_meta")
    monkeypatch.setattr(meta, "CUDA", True)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match="CPU-only build"):
        _loader.load_extension()


def test_missing_build_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "peftkern._build_meta", None)
    with pytest.raises(ImportError, match="has not been built"):
        _loader.load_extension()


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"peftkern {peftkern.__version__}" in out
    assert "CPU kernels:" in out and "GPU:" in out
