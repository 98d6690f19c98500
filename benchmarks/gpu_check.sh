#!/usr/bin/env bash
# The GPU check, in steps that each take a few minutes on an H100 (under the
# 10 minutes one command may run on a lent GPU machine). Each step exits
# non-zero on any failure, printing the tail of its log; logs, JUnit XML and
# JSON go to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_check.sh STEP
#
#   build      build the extension in place (TORCH_CUDA_ARCH_LIST, default 9.0)
#              and run the CUDA op tests (tests/test_ops.py -k cuda: every dtype
#              against the float64 reference); every other step needs it first
#   suite      the whole test suite
#   memcheck   compute-sanitizer memcheck on the CUDA op tests, without
#              PyTorch's caching allocator so that every tensor is its own
#              allocation
#   racecheck  compute-sanitizer racecheck  } on the CUDA op tests, addrmem's
#   synccheck  compute-sanitizer synccheck  } kernels only (not cuBLAS's or
#   initcheck  compute-sanitizer initcheck  } PyTorch's)
#   footprints compute-sanitizer memcheck on issue 18's forward shapes whose
#              tiles once overran their shared memory, against the CPU kernel
#   smem48k    the adjoint past 48 KB of shared memory (opt-in), and past the
#              device's limit (the op's own error)
#   float64    float64 CUDA against the CPU kernel to 1e-14, every test case
#   determinism  the indexed backward, N=8192 with repeats, bit-identical 3 times
#   huge       output and grad_out of more than 2^31 elements
#   instructions  Nsight Compute (ncu): the instructions each addrmem kernel
#              executes per output pixel (per grad_addresses element for the
#              index kernels), forward + backward at N=8192, K=64, 3x32x32,
#              scale 2, float32, a random index with repeats (docs/op.md has
#              the static SASS counts; issue 18's goal: the adjoint <= 80)
#   speed      benchmarks/kernel_speed.py (fails if addrmem mismatches the reference)
#   outer      benchmarks/outer_step.py and benchmarks/distill_speed.py
#   all        every step above, in order (for a machine without a time limit)
#
# Each command runs under `timeout $STEP_LIMIT` (default 470 s), so a step that
# outgrows its budget fails with a message instead of being killed silently.
# SANITIZE_TESTS (pytest -k expression, default "cuda and not large and not
# device_assert") selects the tests the three slower sanitizers run (memcheck
# runs every CUDA op test but the one that trips a device-side assert on
# purpose); SANITIZE_FILTER (default
# "--kernel-regex kns=addrmem") the kernels they check ("" for all).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
STEP_LIMIT=${STEP_LIMIT:-470}
SANITIZE_TESTS=${SANITIZE_TESTS:-cuda and not large and not device_assert}
SANITIZE_FILTER=${SANITIZE_FILTER---kernel-regex kns=addrmem}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# run NAME CMD...: runs CMD with its output in $OUT/NAME.log; on failure
# prints the log's tail and exits with CMD's status.
run() {
  local name=$1
  shift
  echo "== $name: $*"
  local status=0
  timeout "$STEP_LIMIT" "$@" > "$OUT/$name.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$OUT/$name.log"
    [ "$status" -eq 124 ] && echo "$name: over STEP_LIMIT=${STEP_LIMIT}s"
    echo "$name: FAILED (exit $status)"
    exit "$status"
  fi
  tail -n 3 "$OUT/$name.log"
}

need_cuda_build() {
  python3 -c "import addrmem, sys; sys.exit(0 if addrmem.build_info()['cuda'] else 1)" 2> /dev/null \
    || { echo "no CUDA build of addrmem here: run 'bash $0 build' first" >&2; exit 1; }
}

sanitize() {
  local tool=$1
  need_cuda_build
  # shellcheck disable=SC2086  # SANITIZE_FILTER is a list of options
  run "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 $SANITIZE_FILTER \
    python3 -m pytest -q -x tests/test_ops.py -k "$SANITIZE_TESTS" --junitxml "$OUT/$tool.xml"
}

step() {
  case "$1" in
    build)
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
      run build python3 setup.py build_ext --inplace
      python3 -c "import addrmem, json; print(json.dumps(addrmem.build_info()))" | tee "$OUT/build_info.json"
      need_cuda_build
      run cuda_tests python3 -m pytest -q tests/test_ops.py -k cuda --junitxml "$OUT/cuda_tests.xml"
      ;;
    suite)
      need_cuda_build
      run suite python3 -m pytest -q tests --junitxml "$OUT/suite.xml"
      ;;
    memcheck)
      need_cuda_build
      run memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -q -x tests/test_ops.py -k "cuda and not device_assert" --junitxml "$OUT/memcheck.xml"
      ;;
    racecheck | synccheck | initcheck) sanitize "$1" ;;
    footprints)
      need_cuda_build
      run footprints env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -q -x tests/test_ops.py -k issue18_footprints --junitxml "$OUT/footprints.xml"
      ;;
    smem48k | float64 | determinism | huge)
      need_cuda_build
      local test
      test=$(case "$1" in
        smem48k) echo issue18_shared_memory_past_48kb ;;
        float64) echo issue18_float64_matches_cpu_kernel ;;
        determinism) echo issue18_indexed_backward_is_bit_identical ;;
        huge) echo issue18_more_than_2_31_elements ;;
      esac)
      run "$1" python3 -m pytest -q -x tests/test_ops.py -k "$test" --junitxml "$OUT/$1.xml"
      if grep -q "skipped" "$OUT/$1.log" && ! grep -q "passed" "$OUT/$1.log"; then
        echo "$1: the test was skipped"
        exit 1
      fi
      ;;
    instructions)
      need_cuda_build
      command -v ncu > /dev/null || { echo "instructions: ncu (Nsight Compute) not found"; exit 1; }
      run instructions ncu --csv --kernel-name-base demangled --kernel-name regex:addrmem:: --metrics smsp__thread_inst_executed.sum \
        --log-file "$OUT/instructions.csv" python3 -c "
import torch, addrmem
g = torch.Generator(device='cuda').manual_seed(0)
A = torch.randn(8192, 64, device='cuda', generator=g, requires_grad=True)
B = torch.randn(64, 3, 32, 32, device='cuda', generator=g, requires_grad=True)
index = torch.randint(0, 8192, (8192,), device='cuda', generator=g)
out = addrmem.synthesize(A, B, index, 2)
torch.autograd.grad(out, (A, B), torch.randn_like(out))
torch.cuda.synchronize()"
      python3 - "$OUT/instructions.csv" <<'PY' | tee "$OUT/instructions.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
name, value = head.index("Kernel Name"), head.index("Metric Value")
per = {"index_rows": 8192 * 64, "index_segments": 8192}
for r in body:
    kernel = r[name].split("(")[0].split("<")[0].split("::")[-1]
    count = float(r[value].replace(",", ""))
    pixels = next((n for key, n in per.items() if key in kernel), 8192 * 3 * 64 * 64)
    print(f"{kernel:32s} {count / pixels:8.1f} thread instructions per output pixel (or element)")
PY
      ;;
    speed)
      need_cuda_build
      run kernel_speed python3 benchmarks/kernel_speed.py --device cuda --json "$OUT/kernel_speed.json"
      if grep -q "did not match the reference" "$OUT/kernel_speed.log"; then
        grep -E "WARNING|CHECK" "$OUT/kernel_speed.log"
        echo "speed: addrmem mismatched the reference"
        exit 1
      fi
      ;;
    outer)
      need_cuda_build
      run outer_step python3 benchmarks/outer_step.py --device cuda --json "$OUT/outer_step.json"
      run distill_speed python3 benchmarks/distill_speed.py --device cuda --fp64-reference \
        --json "$OUT/distill_speed.json"
      ;;
    all)
      for s in build footprints smem48k float64 determinism huge instructions suite memcheck racecheck synccheck initcheck speed outer; do
        step "$s"
      done
      ;;
    *) usage ;;
  esac
}

[ $# -eq 1 ] || usage
step "$1"
echo "== $1: passed"
