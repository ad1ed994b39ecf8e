#!/usr/bin/env bash
# Builds a peftkern wheel with the given Python; its torch decides the flavour: a CPU torch
# gives a CPU wheel, a CUDA torch plus nvcc a CUDA wheel (no GPU needed). The version's
# local part names both, e.g. 0.1.0+cputorch2.13 or 0.1.0+cu130torch2.14.
#
#   scripts/build_wheel.sh PYTHON OUTDIR
#
# Knobs (see setup.py): PEFTKERN_FORCE_CUDA / PEFTKERN_FORCE_CPU, TORCH_CUDA_ARCH_LIST
# (default 8.0;9.0+PTX), MAX_JOBS, NVCC_THREADS.
set -euo pipefail
# Absolute, but not symlink-resolved: a venv's python is a symlink to the base interpreter.
python=$(command -v "$1")
case "$python" in /*) ;; *) python="$PWD/$python" ;; esac
outdir=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$outdir"

# Build from a copy of the tracked files, so that this checkout's own build (its .so and
# generated _build_meta.py) is neither reused nor overwritten.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z csrc peftkern setup.py pyproject.toml README.md | xargs -0 cp --parents -t "$work"
cd "$work"
"$python" -m pip wheel -q --no-build-isolation --no-deps -w "$outdir" .
ls "$outdir"/peftkern-*.whl
