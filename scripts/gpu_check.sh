#!/usr/bin/env bash
# The GPU check: proves the CUDA path on a machine with an NVIDIA GPU and a CUDA torch (an
# H100/H200 with nothing installable from outside), in one run of a few minutes.
#
#   scripts/gpu_check.sh RESULTS_DIR
#
# Builds the extension for the local GPU only, runs the CUDA tests, runs every CUDA op under
# compute-sanitizer memcheck, runs the kernel benchmarks at the GPU shapes, and writes it all
# into RESULTS_DIR: nvidia-smi.txt, build.log, tests.txt, sanitizer.txt, bench-*.json/csv.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh RESULTS_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/nvidia-smi.txt"

arch=$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
echo "== build for sm_${arch/./} (${SECONDS}s) =="
if ! PEFTKERN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -30 "$out/build.log"; exit 1
fi
python3 -m peftkern.cli info | tee "$out/info.txt"

echo "== CUDA tests (${SECONDS}s) =="
python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer memcheck over every CUDA op (${SECONDS}s) =="
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/cuda_ops_smoke.py > "$out/sanitizer.txt" 2>&1
  rc=$?
  tail -5 "$out/sanitizer.txt"
  # 3 = errors found; anything else non-zero = the sanitizer could not run on this machine
  [ "$rc" -eq 3 ] && status=1
else
  echo "compute-sanitizer not found" | tee "$out/sanitizer.txt"
fi

echo "== benchmarks at the GPU shapes (${SECONDS}s) =="
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  extra=()
  # torch.compile's max-autotune tunes Triton GEMMs for minutes on a GPU; the check has eight.
  [ "$name" = bench_bottleneck_adapter ] && extra=(--compile-modes default)
  python3 "$bench" --rounds 20 "${extra[@]}" --json "$out/$name.json" --csv "$out/$name.csv" || status=1
done
echo "== done (${SECONDS}s) =="
exit $status
