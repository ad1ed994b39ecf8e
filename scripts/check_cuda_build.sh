#!/usr/bin/env bash
# Compiles the CUDA variant of the extension without a GPU and smoke-tests the binary on
# the CPU: CUDA code that no longer compiles or links fails here. Needs nvcc (CUDA 13) and
# installs a CUDA build of torch into a virtual environment of its own.
#
#   scripts/check_cuda_build.sh [VENV_DIR]      (default .venv-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-cuda}
torch_cuda_version=${PEFTKERN_CUDA_TORCH:-2.14.1}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch_cuda_version" numpy setuptools wheel ninja

# Build from a copy so the CPU build in this checkout (its .so and _build_meta.py) stays intact.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z csrc peftkern setup.py pyproject.toml README.md | xargs -0 cp --parents -t "$work"
(
  cd "$work"
  PEFTKERN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" \
    "$OLDPWD/$venv/bin/python" setup.py -q build_ext --inplace
  "$OLDPWD/$venv/bin/python" - <<'PY'
import torch
import peftkern
from peftkern import reference

info = peftkern.build_info()
assert info["cuda"] and info["cuda_archs"], info
x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
w, a, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
y = peftkern.lora_linear(x, w, a, b, scaling=0.5)
torch.testing.assert_close(y, reference.lora_linear(x, w, a, b, scaling=0.5))
y.sum().backward()
print(f"CUDA build OK: peftkern {info['version']} for {info['cuda_archs']} (CUDA {info['cuda_version']}); CPU smoke test passed")
PY
)
