#!/usr/bin/env bash
# GPU check: build in place, run the whole test suite on CUDA, run the GPU
# benchmarks, and leave every log and report in OUT_DIR.
#
#   bash scripts/gpu_check.sh OUT_DIR        (or: make gpu-check OUT_DIR=...)
#
# For a machine with a GPU that already has torch, triton, ninja and pytest
# and may have no network: nothing is installed or downloaded. Uses $PYTHON,
# else python3, else python. The extension is built for the visible card's
# architecture only. Fails at once when no CUDA device is visible or when the
# build has no CUDA kernels (has_cuda_kernels() false): nothing else would
# test them. Then the tests in three parts, each under its own time limit in
# seconds: the CUDA kernels' own tests (GPU_CHECK_CUDA_LIMIT, 120), the Triton
# tests (GPU_CHECK_TRITON_LIMIT, 240), the rest of the suite
# (GPU_CHECK_TEST_LIMIT, 300); then the benchmarks (GPU_CHECK_BENCH_LIMIT, 180).
#
# Writes OUT_DIR/{summary.txt, env.txt, nvidia-smi.txt, build.log,
# tests-{cuda,triton,rest}.log, junit-{cuda,triton,rest}.xml, bench.log}
# plus whatever the benchmark command writes there:
# bench.json, REPORT.md, and autotune_table.json, the per-op choice between
# the CUDA C++ and Triton kernels that backend="auto" follows (summary.txt
# lists it). To use that table: cp OUT_DIR/autotune_table.json neuralmem_fast/
# and commit it.
# Exits non-zero when the build or any test failed; a failing or missing
# benchmark command is recorded in summary.txt but does not fail the check.
set -u

OUT_DIR="${1:-${OUT_DIR:-gpu-results}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."

TEST_LIMIT="${GPU_CHECK_TEST_LIMIT:-300}"
CUDA_LIMIT="${GPU_CHECK_CUDA_LIMIT:-120}"
TRITON_LIMIT="${GPU_CHECK_TRITON_LIMIT:-240}"
BENCH_LIMIT="${GPU_CHECK_BENCH_LIMIT:-180}"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

. scripts/pick_python.sh

note "gpu-check started $(stamp) in $(pwd)"
note "python: $(command -v "$PY") ($("$PY" --version 2>&1))"

# --- machine and versions -------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv >>"$OUT_DIR/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi not found" >"$OUT_DIR/nvidia-smi.txt"
fi
"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print("python", sys.version.replace("\n", " "))
print("platform", platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
for mod in ("triton", "ninja", "pytest", "numpy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:  # a missing optional tool is information, not an error
        print(mod, "missing:", exc)
EOF
cat "$OUT_DIR/env.txt" | tee -a "$SUMMARY"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  note "gpu-check FAILED: no CUDA device visible (torch.cuda.is_available() is False)"
  exit 1
fi

# --- build for this card only -----------------------------------------------
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  CAP=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
  fi
  if [ -z "$CAP" ]; then
    CAP="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)"
  fi
  export TORCH_CUDA_ARCH_LIST="${CAP:-8.0;9.0+PTX}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
unset NEURALMEM_NO_CUDA
note "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

t0=$(date +%s)
"$PY" setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1
BUILD_RC=$?
note "build: rc=$BUILD_RC in $(( $(date +%s) - t0 )) s (log: build.log)"
if [ $BUILD_RC -ne 0 ]; then
  tail -n 40 "$OUT_DIR/build.log"
  note "gpu-check FAILED: the build failed"
  exit 1
fi
"$PY" -c "import neuralmem_fast as nm, torch; print('has_cuda_kernels', nm.has_cuda_kernels(), 'cuda available', torch.cuda.is_available())" 2>&1 | tee -a "$SUMMARY"
if ! "$PY" -c "import sys, torch, neuralmem_fast as nm; sys.exit(0 if nm.has_cuda_kernels() and torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  note "gpu-check FAILED: the extension has no CUDA kernels (has_cuda_kernels() is False; is nvcc on PATH or CUDA_HOME set?)"
  exit 1
fi

# --- the tests on CUDA: the CUDA kernels, the Triton kernels, then the rest ------------
TEST_RC=0
# tests NAME LIMIT VAR ARGS...: one part of the suite under its own time limit.
tests() {
  local name="$1" limit="$2" var="$3"
  shift 3
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" \
    "$PY" -m pytest -q -rfEs --junitxml="$OUT_DIR/junit-$name.xml" "$@" >"$OUT_DIR/tests-$name.log" 2>&1
  local rc=$?
  note "tests ($name): rc=$rc in $(( $(date +%s) - t0 )) s (log: tests-$name.log, junit-$name.xml)"
  [ $rc -eq 124 ] && note "tests ($name): stopped after ${limit} s ($var)"
  tail -n 3 "$OUT_DIR/tests-$name.log" | tee -a "$SUMMARY"
  [ $rc -ne 0 ] && TEST_RC=$rc
  return 0
}
tests cuda "$CUDA_LIMIT" GPU_CHECK_CUDA_LIMIT tests/test_cuda_build.py
tests triton "$TRITON_LIMIT" GPU_CHECK_TRITON_LIMIT tests/test_triton.py
tests rest "$TEST_LIMIT" GPU_CHECK_TEST_LIMIT tests \
  --ignore=tests/test_cuda_build.py --ignore=tests/test_triton.py

# --- GPU benchmarks (never fatal) ------------------------------------------------
TABLE="$OUT_DIR/autotune_table.json"
# Files of an earlier check in the same folder must not pass for this run's.
rm -f "$OUT_DIR/bench.json" "$TABLE"
t0=$(date +%s)
timeout --signal=INT --kill-after=20 "$BENCH_LIMIT" \
  "$PY" -m neuralmem_fast bench --gpu --out "$OUT_DIR" >"$OUT_DIR/bench.log" 2>&1
BENCH_RC=$?
note "bench: rc=$BENCH_RC in $(( $(date +%s) - t0 )) s (log: bench.log)"
if [ $BENCH_RC -ne 0 ]; then
  note "bench: FAILED or unavailable (not fatal); last lines:"
  tail -n 10 "$OUT_DIR/bench.log" | tee -a "$SUMMARY"
fi

# --- the backend table of backend="auto" (never fatal) ---------------------------
if [ ! -f "$TABLE" ] && [ -f "$OUT_DIR/bench.json" ]; then
  # The bench stopped before it wrote the table (e.g. at the time limit): build
  # it from the rows that bench.json holds.
  "$PY" -m neuralmem_fast autotune "$OUT_DIR/bench.json" --out "$TABLE" \
    --bench-command "python -m neuralmem_fast bench --gpu --out $OUT_DIR (rc=$BENCH_RC)" >>"$OUT_DIR/bench.log" 2>&1
fi
if [ -f "$TABLE" ]; then
  note "autotune: $TABLE (to use it: cp it to neuralmem_fast/autotune_table.json and commit)"
  "$PY" -m neuralmem_fast autotune --show --table "$TABLE" 2>&1 | tee -a "$SUMMARY"
else
  note "autotune: no table (bench.json missing or without GPU rows; see bench.log)"
fi

note "gpu-check finished $(stamp)"
if [ $TEST_RC -ne 0 ]; then
  note "gpu-check FAILED: tests failed (rc=$TEST_RC)"
  exit 1
fi
note "gpu-check passed"
exit 0
