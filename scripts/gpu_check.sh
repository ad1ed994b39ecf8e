#!/usr/bin/env bash
# The GPU check: proves the CUDA path on a machine with an NVIDIA GPU and a CUDA torch (an
# H100/H200 with nothing installable from outside), in one run of about 8 minutes.
#
#   scripts/gpu_check.sh RESULTS_DIR                       the real run, on the GPU machine
#   scripts/gpu_check.sh --dry-run [--arch 9.0] RESULTS_DIR every step that needs no GPU, here
#
# The real run builds the extension in place for the local GPU only (MAX_JOBS = all cores:
# 16 on the H200 machine), runs the CUDA tests, runs every CUDA op under compute-sanitizer
# memcheck, runs the kernel benchmarks at the GPU shapes, and writes it all into RESULTS_DIR:
# nvidia-smi.txt, build.log, info.txt, tests.txt, sanitizer.txt, bench-*.json/csv. It needs
# only python3 with torch (CUDA), setuptools, ninja, pytest and the test dependencies that
# image already has: no pip, no network.
#
# GPU minutes are rare, so the dry run (CI runs it) exercises the script itself: the build for
# the given architecture, the import and build_info, collecting the CUDA tests, importing the
# sanitizer script, and every benchmark's argument parsing with a tiny CPU case. Each step has
# a time limit, so one that hangs cannot eat the others' minutes.
set -uo pipefail
dry_run=0 arch=""
while [ $# -gt 1 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --arch) arch="$2"; shift 2 ;;
    *) break ;;
  esac
done
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh [--dry-run] [--arch X.Y] RESULTS_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() { echo "== $1 (${SECONDS}s) =="; }
# A step that fails marks the run failed but does not stop the steps after it.
fail() { echo "FAILED: $1"; status=1; }

if [ "$dry_run" = 1 ]; then
  arch=${arch:-9.0}
  echo "dry run: no GPU; building for sm_${arch/./}" | tee "$out/nvidia-smi.txt"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    | tee "$out/nvidia-smi.txt"
  arch=${arch:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
fi

step "build for sm_${arch/./} with MAX_JOBS=${MAX_JOBS:-$(nproc)}"
if ! PEFTKERN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  timeout 2700 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -30 "$out/build.log"
  exit 1  # nothing after this can run without the extension
fi
timeout 120 python3 -m peftkern.cli info | tee "$out/info.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "import and build_info"
grep -q "sm_${arch/./}\|${arch}" "$out/info.txt" || fail "build_info does not list arch ${arch}"

if [ "$dry_run" = 1 ]; then
  step "collect the CUDA tests"
  timeout 300 python3 -m pytest -q --collect-only -m cuda -p no:cacheprovider tests > "$out/tests.txt" 2>&1
  collected=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? (collected|selected)' "$out/tests.txt" | grep -Eo '^[0-9]+' | head -1)
  tail -1 "$out/tests.txt"
  [ "${collected:-0}" -gt 0 ] || fail "no CUDA test collected"
  step "import the sanitizer script"
  timeout 120 python3 -c 'import runpy; runpy.run_path("scripts/cuda_ops_smoke.py", run_name="imported")' \
    > "$out/sanitizer.txt" 2>&1 || fail "scripts/cuda_ops_smoke.py does not import"
else
  step "CUDA tests"
  timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/tests.txt" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail "CUDA tests"

  step "compute-sanitizer memcheck over every CUDA op"
  if command -v compute-sanitizer > /dev/null; then
    timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/cuda_ops_smoke.py \
      > "$out/sanitizer.txt" 2>&1
    rc=$?
    tail -5 "$out/sanitizer.txt"
    # 3 = errors found; anything else non-zero = the sanitizer could not run on this machine
    [ "$rc" -eq 3 ] && fail "compute-sanitizer found errors"
  else
    echo "compute-sanitizer not found" | tee "$out/sanitizer.txt"
  fi
fi

step "benchmarks"
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  if [ "$dry_run" = 1 ]; then
    args=(--quick --rounds 1)
    limit=300
  else
    # About 8 minutes in all: build 2, tests 1-2, sanitizer 1-2, leaving about 3 for the
    # benchmarks (estimates: this script has not yet run on a GPU).
    args=(--rounds 10)
    limit=150
  fi
  timeout "$limit" python3 "$bench" "${args[@]}" --json "$out/$name.json" --csv "$out/$name.csv" \
    > "$out/$name.txt" 2>&1 || fail "$name"
  tail -3 "$out/$name.txt"
done
step "done"
exit $status
