#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (offline image: CUDA torch + triton, no internet).
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT when set (relative: to the current directory),
#                                           # else to <repository>/bench-out
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   SKIP_INSTALL=1 OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh   # dry run on a CPU machine (CPU bench)
#
# 1. installs this checkout without touching the image's torch/triton (--no-deps, --no-build-isolation, --no-index);
#    if that fails, it goes on with the checkout on PYTHONPATH (fused_ops finds kernels/ itself);
# 2. prints `python -m fused_ops info` (to $OUT/info.txt);
# 3. runs the GPU test tier (`pytest -m gpu`), output to $OUT/pytest_gpu.txt; the bench runs even if it fails;
# 4. runs the quick benchmark, writing $OUT/bench_<device>_<date>.json and .png (commit both under
#    benchmarks/results/, then `python -m fused_ops report`). The JSON is rewritten after every case, so even a
#    killed bench leaves every finished case on disk.
# Whole script: under 6 minutes on an H100. The tests get at most 240 s (less when install/info were slow), the bench
# what is left of a 345 s budget (at most 200 s, at least 60 s); it stops starting new cases 45 s before its
# timeout, so the JSON and PNG are written, and a SIGTERM from `timeout` also ends it with both written.
# Exit status: non-zero when the tests or the bench failed; both codes are in $OUT/status.txt.
# No step may abort the script before the bench: every command that can fail is guarded (set -e stays on for
# the script's own logic).
set -euo pipefail
SECONDS=0
OUT="${OUT:-}"
if [ -n "$OUT" ]; then  # relative to where the script was started, resolved before the cd below
    mkdir -p "$OUT"
    OUT="$(cd "$OUT" && pwd)"
fi
cd "$(dirname "$0")/.."
REPO="$(pwd)"
if [ -z "$OUT" ]; then
    OUT="$REPO/bench-out"
    mkdir -p "$OUT"
fi
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi
echo "repository: $REPO; output: $OUT; python: $(command -v "$PY" || echo "$PY")"

echo "== install"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then  # SKIP_INSTALL=1: dry runs in an environment that must not change
    set +e
    timeout -k 5 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check \
        -q -e . > "$OUT/pip_install.txt" 2>&1
    PIP_RC=$?
    set -e
    tail -n 5 "$OUT/pip_install.txt" || true
    if [ "$PIP_RC" -ne 0 ]; then
        echo "pip install failed (exit $PIP_RC, see pip_install.txt): using the checkout through PYTHONPATH"
    fi
fi
# Either way the checkout is what runs (an older installed copy must not shadow it).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "== info"
set +e
timeout -k 5 60 "$PY" -m fused_ops info 2>&1 | tee "$OUT/info.txt"
INFO_RC=${PIPESTATUS[0]}
set -e
[ "$INFO_RC" -eq 0 ] || echo "fused_ops info failed (exit $INFO_RC)"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

# The tests get at most 240 s, and less when the steps above were slow: the bench keeps at least ~100 s.
PYTEST_TIMEOUT=$((345 - 100 - SECONDS))
PYTEST_TIMEOUT=$(( PYTEST_TIMEOUT > 240 ? 240 : PYTEST_TIMEOUT ))
PYTEST_TIMEOUT=$(( PYTEST_TIMEOUT < 60 ? 60 : PYTEST_TIMEOUT ))
echo "== pytest -m gpu (after ${SECONDS}s; timeout ${PYTEST_TIMEOUT}s)"
set +e
timeout -k 10 "$PYTEST_TIMEOUT" "$PY" -m pytest -m gpu -q -x -ra -p no:cacheprovider --durations=10 tests/ 2>&1 \
    | tee "$OUT/pytest_gpu.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e
echo "pytest -m gpu exit code: $TESTS_RC"

DEVICE="$(timeout -k 5 60 "$PY" -m fused_ops info --slug 2>/dev/null)" || DEVICE=""
DEVICE="$(printf '%s\n' "$DEVICE" | tail -n 1 | tr -cd 'a-z0-9-')" || DEVICE=""
DEVICE="${DEVICE:-unknown-device}"
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
[ -s "$BASE.json" ] || echo "no $BASE.json was written"

printf 'pytest_gpu=%s\nbench=%s\nseconds=%s\n' "$TESTS_RC" "$BENCH_RC" "$SECONDS" | tee "$OUT/status.txt"
ls -l "$OUT" || true
if [ "$TESTS_RC" -ne 0 ] || [ "$BENCH_RC" -ne 0 ]; then
    exit 1
fi
