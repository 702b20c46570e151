#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (offline image: CUDA torch + triton, no internet).
#
#   bash benchmarks/gpu_check.sh            # writes to ./bench-out
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# 1. installs this checkout without touching the image's torch/triton (--no-deps, --no-build-isolation);
# 2. prints `python -m fused_ops info`;
# 3. runs the GPU test tier (`pytest -m gpu`), output to $OUT/pytest_gpu.txt; the bench runs even if it fails;
# 4. runs the quick benchmark, writing $OUT/bench_<device>_<date>.json and .png (commit both under
#    benchmarks/results/, then `python -m fused_ops report`).
# Whole script: under 6 minutes on an H100. The bench gets what is left of a 345 s budget (at most 200 s), and
# stops starting new cases 45 s before its timeout, so the JSON and PNG are always written.
# Exit status: non-zero when the tests or the bench failed; both codes are in $OUT/status.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
SECONDS=0

echo "== install"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then  # SKIP_INSTALL=1: dry runs in an environment that must not change
    "$PY" -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -n 5
fi

echo "== info"
"$PY" -m fused_ops info | tee "$OUT/info.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

echo "== pytest -m gpu (after ${SECONDS}s)"
set +e
timeout -k 10 240 "$PY" -m pytest -m gpu -q -x tests/ 2>&1 | tee "$OUT/pytest_gpu.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e
echo "pytest -m gpu exit code: $TESTS_RC"

DEVICE="$("$PY" -m fused_ops info --slug)"
STAMP="$(date -u +%Y%m%d)"
BASE="$OUT/bench_${DEVICE}_${STAMP}"
LEFT=$((345 - SECONDS))
BENCH_TIMEOUT=$(( LEFT < 200 ? LEFT : 200 ))
BENCH_TIMEOUT=$(( BENCH_TIMEOUT < 60 ? 60 : BENCH_TIMEOUT ))
BUDGET=$((BENCH_TIMEOUT - 45))
PLOT=(--plot "$BASE.png")
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    echo "matplotlib is not installed: no PNG this time"
    PLOT=()
fi

echo "== bench --quick (after ${SECONDS}s; timeout ${BENCH_TIMEOUT}s, budget ${BUDGET}s)"
set +e
timeout -k 15 "$BENCH_TIMEOUT" "$PY" -m fused_ops bench --quick --params gpt2-124m,small-10k --dtype fp32,bf16 \
    --budget-s "$BUDGET" --json "$BASE.json" ${PLOT[@]+"${PLOT[@]}"} 2>&1 | tee "$OUT/bench.txt"
BENCH_RC=${PIPESTATUS[0]}
set -e
echo "bench exit code: $BENCH_RC"

printf 'pytest_gpu=%s\nbench=%s\nseconds=%s\n' "$TESTS_RC" "$BENCH_RC" "$SECONDS" | tee "$OUT/status.txt"
ls -l "$OUT"
if [ "$TESTS_RC" -ne 0 ] || [ "$BENCH_RC" -ne 0 ]; then
    exit 1
fi
