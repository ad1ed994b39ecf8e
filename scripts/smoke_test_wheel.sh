#!/usr/bin/env bash
# Installs a peftkern wheel into a fresh virtual environment with the given torch and checks
# it there: import, `peftkern info`, and one LoRA forward/backward on the CPU against the
# reference.
#
#   scripts/smoke_test_wheel.sh [--reuse-venv] WHEEL TORCH_REQUIREMENT VENV_DIR
#
# --reuse-venv installs into VENV_DIR as it is (it must exist) instead of a new one: CI uses it
# for the CUDA wheel, whose torch alone takes about 5.5 GB of disk.
set -euo pipefail
reuse_venv=false
if [ "${1:-}" = --reuse-venv ]; then reuse_venv=true; shift; fi
wheel=$(realpath "$1")
torch_requirement=$2
venv=$(realpath -m "$3")

if ! $reuse_venv; then
    rm -rf "$venv"
    python3 -m venv "$venv"
elif [ ! -x "$venv/bin/python" ]; then
    echo "--reuse-venv: no virtual environment at $venv" >&2
    exit 1
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_requirement" "$wheel"
cd "$(mktemp -d)"  # import the installed wheel, not a checkout
"$venv/bin/peftkern" info
"$venv/bin/python" - <<'PY'
import torch

import peftkern
from peftkern import reference

torch.manual_seed(0)
x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
w = torch.randn(8, 16, dtype=torch.float64)
a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
y = peftkern.lora_linear(x, w, a, b, scaling=0.5)
y_ref = reference.lora_linear(x, w, a, b, scaling=0.5)
torch.testing.assert_close(y, y_ref)
grads = torch.autograd.grad(y.sum(), [x, a, b])
ref_grads = torch.autograd.grad(y_ref.sum(), [x, a, b])
for got, want in zip(grads, ref_grads):
    torch.testing.assert_close(got, want)
print(f"wheel OK: peftkern {peftkern.__version__} under torch {torch.__version__}")
PY
