"""The `peftkern` command."""

from __future__ import annotations

import argparse
import sys

import torch


def _info() -> int:
    import peftkern

    info = peftkern.build_info()
    print(f"peftkern {info['version']} (built with torch {info['torch_version']}, running torch {torch.__version__})")
    if info["cuda"]:
        print(f"CUDA kernels: compiled with CUDA {info['cuda_version']} for {info['cuda_archs']}")
    else:
        print("CUDA kernels: not compiled (CPU build)")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    print(f"GPU: {', '.join(gpus) if gpus else 'none'}")
    print(f"CPU kernels: {info['cpu_isa']} on {torch.get_num_threads()} threads")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftkern", description="Fused kernels for parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="build information and what this machine offers")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
