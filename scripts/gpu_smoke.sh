#!/usr/bin/env bash
# GPU smoke check: about two minutes on one card, to run the moment one is at
# hand, after the extension was built with its CUDA kernels (make build, or
# make gpu-check, which builds for the visible card).
#
#   bash scripts/gpu_smoke.sh OUT_DIR            (or: make gpu-smoke OUT_DIR=...)
#   bash scripts/gpu_smoke.sh OUT_DIR --dry-run  prints what it would run
#
# 1. preflight: fails loudly without a CUDA device or without the CUDA kernels.
# 2. compute-sanitizer memcheck, racecheck and synccheck over every op on tiny
#    odd shapes that take the split and multi-tile paths, float32 and float16,
#    with misaligned views (scripts/gpu_smoke.py tiny --tool TOOL).
# 3. the split path at N ~ 3e5, D 64 and 300: parity with float64 and
#    bit-for-bit repeatability (gpu_smoke.py parity).
# 4. index cases past 2^31 elements (gpu_smoke.py large).
# 5. content_read at N = 16M against copy_ on the same tensor
#    (gpu_smoke.py bandwidth): OUT_DIR/bandwidth.{json,md}.
# 6. the sparse access ops against their references (gpu_smoke.py sparse).
# Each part runs under its own time limit (GPU_SMOKE_*_LIMIT seconds) and
# writes its log to OUT_DIR; OUT_DIR/summary.txt lists every part's result.
# Exits non-zero when any part failed or ran out of time.
set -u

OUT_DIR="${1:-gpu-smoke}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."

. scripts/pick_python.sh
SMOKE="scripts/gpu_smoke.py"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

SANITIZER="${COMPUTE_SANITIZER:-}"
if [ -z "$SANITIZER" ]; then
  SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$cand" ] && SANITIZER="$cand"
  done
fi

FAILED=0
# run NAME LIMIT CMD...: one part under its own time limit, log in OUT_DIR/NAME.log.
run() {
  local name="$1" limit="$2"
  shift 2
  if [ $DRY -eq 1 ]; then
    note "would run [$name, ${limit} s]: $*"
    return 0
  fi
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - t0 )) s (log: $name.log)"
  [ $rc -eq 124 ] && note "$name: stopped after ${limit} s"
  if [ $rc -ne 0 ]; then
    tail -n 15 "$OUT_DIR/$name.log" | tee -a "$SUMMARY"
    FAILED=1
  fi
  return $rc
}

note "gpu-smoke started $(date -u +%Y-%m-%dT%H:%M:%SZ) with $PY"

# --- 1. preflight: a card and the CUDA kernels, or stop here ---------------
if [ $DRY -eq 1 ]; then
  note "would run [preflight]: $PY $SMOKE preflight"
elif ! "$PY" "$SMOKE" preflight 2>&1 | tee -a "$SUMMARY"; then
  note "gpu-smoke FAILED: no CUDA device or no CUDA kernels built (see above)"
  exit 1
fi

# --- 2. the sanitizer on tiny shapes ---------------------------------------------
if [ -z "$SANITIZER" ] && [ $DRY -eq 0 ]; then
  note "sanitizer: compute-sanitizer not found (set COMPUTE_SANITIZER)"
  FAILED=1
else
  SAN="${SANITIZER:-compute-sanitizer}"
  for tool in memcheck racecheck synccheck; do
    run "sanitize-$tool" "${GPU_SMOKE_SANITIZER_LIMIT:-60}" \
      "$SAN" --tool "$tool" --error-exitcode 3 --target-processes all \
      "$PY" "$SMOKE" tiny --tool "$tool" --out "$OUT_DIR"
  done
fi

# --- 3.-5. parity, large indices, bandwidth ------------------------------------------
run parity "${GPU_SMOKE_PARITY_LIMIT:-45}" "$PY" "$SMOKE" parity --out "$OUT_DIR"
run large "${GPU_SMOKE_LARGE_LIMIT:-60}" "$PY" "$SMOKE" large --out "$OUT_DIR"
run bandwidth "${GPU_SMOKE_BANDWIDTH_LIMIT:-45}" "$PY" "$SMOKE" bandwidth --out "$OUT_DIR"
run sparse "${GPU_SMOKE_SPARSE_LIMIT:-45}" "$PY" "$SMOKE" sparse --out "$OUT_DIR"
[ -f "$OUT_DIR/bandwidth.md" ] && tee -a "$SUMMARY" <"$OUT_DIR/bandwidth.md"

if [ $DRY -eq 1 ]; then
  for part in tiny parity large bandwidth sparse; do
    "$PY" "$SMOKE" "$part" --dry-run | tee -a "$SUMMARY"
  done
  exit 0
fi
if [ $FAILED -ne 0 ]; then
  note "gpu-smoke FAILED"
  exit 1
fi
note "gpu-smoke passed"
