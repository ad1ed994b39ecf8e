#!/usr/bin/env bash
# Runs peft's own LoRA and prefix-tuning tests twice, as they are and with every PeftModel
# passed through peftkern.patch_peft (scripts/peer_peft_plugin.py), and lists the tests that
# fail only patched. peft's source distribution is fetched for the installed peft version.
# Tests that need the Hub's tiny models fail offline in both runs; only the difference counts.
#
#   scripts/peer_peft.sh [extra pytest arguments, e.g. -x or --maxfail=50]
# Environment: PEER_DIR (work directory, default /tmp/peftkern-peer), PEER_K (the -k
# expression, default "lora or dora or prefix": -k ignores case, so "lora" takes the "... LoRA
# with DoRA" and "... LoRA with lora_b bias" cases, "dora" the DoRA tests whose names say only
# DoRA), PEER_TESTS (default: tests/test_custom_models.py tests/test_decoder_models.py).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${PEER_DIR:-/tmp/peftkern-peer}
mkdir -p "$work"
work=$(cd "$work" && pwd)  # absolute: the tests run from inside it
select=${PEER_K:-lora or dora or prefix}
tests=${PEER_TESTS:-tests/test_custom_models.py tests/test_decoder_models.py}
version=$(python3 -c 'import peft; print(peft.__version__)')
if [ ! -d "$work/peft-$version/tests" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "peft==$version" -d "$work"
  tar -xzf "$work/peft-$version.tar.gz" -C "$work"
fi
cd "$work/peft-$version"
# The tests import each other relatively; the source distribution leaves out their __init__.py.
touch tests/__init__.py
# peft's test helpers import diffusers and datasets at module level; where they are not
# installed, stand-ins let the LoRA and prefix tests load (the few tests that use them fail
# alike in both runs).
stubs="$work/stubs"
mkdir -p "$stubs"
python3 -c 'import diffusers' 2>/dev/null ||
  echo 'class StableDiffusionPipeline: """stand-in: diffusers is not installed"""' >"$stubs/diffusers.py"
python3 -c 'import datasets' 2>/dev/null ||
  printf 'def load_dataset(*args, **kwargs):\n    raise ImportError("datasets is not installed")\n' >"$stubs/datasets.py"
# The tests import peft from site-packages (the installed version), peftkern from this checkout.
export PYTHONPATH="$root:$root/scripts:$stubs${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() {  # run NAME [pytest arguments]: JUnit XML to $work/NAME.xml
  local name=$1
  shift
  local start=$SECONDS
  # pytest's exit status is 1 whenever a test fails, which the unpatched run expects too.
  python3 -m pytest -q -p no:cacheprovider -o addopts= $tests -k "$select" \
    --junitxml="$work/$name.xml" "$@" >"$work/$name.log" 2>&1 || true
  echo "$name: $(tail -n 1 "$work/$name.log") ($((SECONDS - start)) s)"
}

run unpatched "$@"
PEFTKERN_PEER_COUNTS="$work/counts.json" run patched -p peer_peft_plugin "$@"

python3 - "$work" <<'PY'
import json, sys
import xml.etree.ElementTree as ET

work = sys.argv[1]

def failed(name):
    bad = set()
    for case in ET.parse(f"{work}/{name}.xml").iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.add(f"{case.get('classname')}::{case.get('name')}")
    return bad

def ran(name):
    return sum(1 for _ in ET.parse(f"{work}/{name}.xml").iter("testcase"))

# A check that ran nothing (an import error, a -k that matches no test) must not pass.
tests_run = {name: ran(name) for name in ("unpatched", "patched")}
print(f"tests: {tests_run['unpatched']} unpatched, {tests_run['patched']} patched")
if not tests_run["patched"] or tests_run["patched"] != tests_run["unpatched"]:
    sys.exit("the two runs must run the same tests, and at least one")
only_patched = sorted(failed("patched") - failed("unpatched"))
only_unpatched = sorted(failed("unpatched") - failed("patched"))
counts = json.load(open(f"{work}/counts.json"))
print(f"patched run: {counts['models']} models patched, {counts['layers_patched']} layers patched "
      f"({counts['patched_lora']} LoRA, {counts['patched_dora']} DoRA, {counts['patched_lora_bias']} "
      f"lora_bias, {counts['patched_prefix']} prefix), {counts['layers_skipped']} skipped; "
      f"{counts['fused_lora_calls']} fused LoRA calls, {counts['fused_dora_calls']} fused DoRA calls, "
      f"{counts['prefix_calls']} prefix-attention calls")
for reason, n in sorted(counts["skipped_reasons"].items(), key=lambda item: -item[1])[:8]:
    print(f"  skipped {n}: {reason}")
if not counts["layers_patched"]:
    sys.exit("the patched run patched no layer: the plugin did not engage")
print(f"fail only patched: {len(only_patched)}")
for test in only_patched:
    print(f"  {test}")
if only_unpatched:
    print(f"fail only unpatched: {len(only_unpatched)}")
    for test in only_unpatched:
        print(f"  {test}")
sys.exit(1 if only_patched else 0)
PY
