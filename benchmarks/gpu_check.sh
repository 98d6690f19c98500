#!/usr/bin/env bash
# One command for a GPU machine: build the extension for the GPU at hand, run
# the test suite (the CUDA tests run there), run the CUDA op tests under
# compute-sanitizer, and benchmark the kernels, one outer iteration and addrmem
# against the official-style algorithm. Logs and JSON go to $OUT
# (default ./gpu-out).
#   TORCH_CUDA_ARCH_LIST=9.0 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import addrmem, json; print(json.dumps(addrmem.build_info()))" | tee "$OUT/build_info.json"

python3 -m pytest -q tests -x 2>&1 | tee "$OUT/tests.log" | tail -5
compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x tests/test_ops.py -k cuda \
  > "$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer memcheck exit: $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -3
compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest -q -x tests/test_ops.py -k "cuda and not large" \
  > "$OUT/racecheck.log" 2>&1
echo "compute-sanitizer racecheck exit: $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3

python3 benchmarks/kernel_speed.py --json "$OUT/kernel_speed.json" 2>&1 | tee "$OUT/kernel_speed.txt"
python3 benchmarks/outer_step.py --device cuda --json "$OUT/outer_step.json" 2>&1 | tee "$OUT/outer_step.txt"
python3 benchmarks/distill_speed.py --device cuda --fp64-reference --json "$OUT/distill_speed.json" 2>&1 \
  | tee "$OUT/distill_speed.txt"
