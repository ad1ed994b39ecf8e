#!/usr/bin/env bash
# Installs a wheel built for one torch into a venv holding another, and checks that the
# import fails with a message naming both versions (instead of an undefined-symbol error).
#
#   scripts/check_torch_mismatch.sh WHEEL VENV_WITH_OTHER_TORCH
set -euo pipefail
wheel=$(realpath "$1")
venv=$(realpath "$2")
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
cd "$(mktemp -d)"
"$venv/bin/python" - <<'PY'
import torch

try:
    import peftkern  # noqa: F401
except ImportError as error:
    message = str(error)
    installed = torch.__version__.split("+")[0]
    assert "was built against torch" in message and installed in message, message
    print(f"mismatch refused as it should be: {message}")
else:
    raise SystemExit("a wheel built for another torch imported without complaint")
PY
