#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (offline image: CUDA torch + triton, no internet).
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT when set (relative: to the current directory),
#                                           # else to <repository>/bench-out
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   SKIP_INSTALL=1 OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh   # dry run on a CPU machine (CPU bench)
#   GPU_CHECK_BUDGET_S=300 ...              # a shorter whole-script budget (default 420 s)
#
# 0. preflight ($OUT/preflight.txt, also appended to info.txt): pytest imports; a C compiler as Triton looks for
#    one ($CC, else gcc, else clang) that builds a shared object including Python.h from sysconfig's include dir
#    (Triton compiles its launcher on first use: without them every kernel launch fails); torch, triton, devices.
#    TRITON_CACHE_DIR is set under /tmp (/tmp/triton-cache-<pid>) unless already set.
# 1. installs this checkout without touching the image's torch/triton (--no-deps, --no-build-isolation, --no-index);
#    if that fails, it goes on with the checkout on PYTHONPATH (fused_ops finds kernels/ itself); the peers' wheels
#    in third_party_wheels/ (benchmarks/fetch_peers.sh), when present, go to a folder of their own on PYTHONPATH;
# 2. prints `python -m fused_ops info` (to $OUT/info.txt);
# 3. runs the GPU test tier (`pytest -m gpu`) in three pytest processes (a kernel fault is a sticky CUDA error that
#    would fail every later test of its process), output to $OUT/pytest_gpu.txt, pytest_gpu_family.txt and
#    pytest_gpu_rest.txt (+ .xml); no -x: every failure is reported, not only the first. tests/test_gpu.py first,
#    then tests/test_gpu_family.py (the compiled kernels, CUDA graphs, the 2^31-element offsets), then the GPU cases
#    of the other files (NCCL, FSDP2 in a child), so a slow start cannot crowd out the core tests. (The safety tier is not run here: on a CUDA machine its Triton
#    cases skip, being interpreter cases, and the rest runs on CPU tensors, as CI runs it.)
# 4. runs two benchmarks: the optimizer family's targets ($OUT/bench_<device>_<date>_targets.json: 8-bit AdamW
#    against fp32 FusedAdamW, torch's fused AdamW and the 8-bit peers, on 10,000 small tensors and GPT-2 shapes),
#    then the quick benchmark of every op ($OUT/bench_<device>_<date>.json); each with its PNG (commit them under
#    benchmarks/results/, then `python -m fused_ops report`). A JSON is rewritten after every case, so even a
#    killed bench leaves every finished case on disk.
# Whole script: under 7 minutes (GPU_CHECK_BUDGET_S). The GPU tests get at most 230 s (less when the steps before
# were slow), the targets bench at most 100 s, the quick bench what is left (at most 200 s); each bench at least
# 60 s. A bench stops starting new cases 45 s before its timeout, so its
# JSON and PNG are written, and a SIGTERM from `timeout` also ends it with both written.
# Exit status: non-zero when the preflight, the test tier or the bench failed; every step's code is appended to
# $OUT/status.txt as the step ends (a run killed midway still leaves the codes of the steps it finished).
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
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
# Triton's kernel and launcher cache: somewhere writable and fresh, not a home directory the image may lack.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-$$}"
mkdir -p "$TRITON_CACHE_DIR" || true
echo "TRITON_CACHE_DIR=$TRITON_CACHE_DIR"

echo "== preflight"
set +e
timeout -k 5 120 "$PY" - > "$OUT/preflight.txt" 2>&1 <<'PREFLIGHT'
import os, shutil, subprocess, sys, sysconfig, tempfile

failed = []


def report(name, ok, detail):
    print(f"{name}: {'ok' if ok else 'MISSING'} ({detail})", flush=True)
    if not ok:
        failed.append(name)


print(f"python: {sys.executable} {sys.version.split()[0]}")
print(f"TRITON_CACHE_DIR: {os.environ.get('TRITON_CACHE_DIR')}")
try:
    import pytest

    report("pytest", True, f"pytest {pytest.__version__}")
except Exception as e:  # the test tiers cannot run
    report("pytest", False, repr(e))
# Triton builds its launcher with $CC, else gcc, else clang, against Python.h (triton/runtime/build.py).
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
report("c_compiler", cc is not None, cc or "no $CC, gcc or clang on PATH")
scheme = sysconfig.get_default_scheme() if hasattr(sysconfig, "get_default_scheme") else None
scheme = "posix_prefix" if scheme == "posix_local" else scheme
include = (sysconfig.get_paths(scheme=scheme) if scheme else sysconfig.get_paths())["include"]
header = os.path.join(include, "Python.h")
report("python_headers", os.path.exists(header), header)
if cc is not None and os.path.exists(header):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint fused_ops_probe(void) { return Py_IsInitialized(); }\n")
        try:
            r = subprocess.run([cc, src, "-O0", "-shared", "-fPIC", "-o", os.path.join(d, "probe.so"), "-I" + include],
                               capture_output=True, text=True, timeout=60)
            report("c_build", r.returncode == 0, "a shared object including Python.h" if r.returncode == 0
                   else r.stderr.strip()[-400:])
        except Exception as e:
            report("c_build", False, repr(e))
# Test modules import these at the top (pytest imports every module before selecting by marker); without them
# those modules fail to collect and the tier goes on without them (--continue-on-collection-errors). Not fatal.
for mod in ("hypothesis", "numpy", "matplotlib"):
    try:
        m = __import__(mod)
        print(f"{mod}: ok ({mod} {getattr(m, '__version__', '?')})", flush=True)
    except Exception as e:
        print(f"{mod}: absent, not required ({e!r}): test modules importing it are not collected", flush=True)
for mod in ("torch", "triton"):
    try:
        m = __import__(mod)
        extra = f", CUDA {m.version.cuda}, {m.cuda.device_count()} device(s)" if mod == "torch" else ""
        report(mod, True, f"{mod} {m.__version__}{extra}")
    except Exception as e:
        report(mod, False, repr(e))
print("preflight=" + ("ok" if not failed else "FAILED: " + ",".join(failed)))
sys.exit(1 if failed else 0)
PREFLIGHT
PREFLIGHT_RC=$?
set -e
printf 'preflight=%s\n' "$PREFLIGHT_RC" > "$OUT/status.txt"
cat "$OUT/preflight.txt" || true
PYTEST_OK=1
grep -q '^pytest: ok' "$OUT/preflight.txt" 2>/dev/null || PYTEST_OK=0

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

# The bench's peers, when their wheels were carried here (benchmarks/fetch_peers.sh on a machine with PyPI, then
# third_party_wheels/ travels with the checkout): installed --no-deps into a folder of their own, after the
# checkout on PYTHONPATH, so the image's torch and packages stay as they are.
if compgen -G "third_party_wheels/*.whl" >/dev/null; then
    PEERS_DIR="${TMPDIR:-/tmp}/fused-ops-peers-$$"
    set +e
    timeout -k 5 120 "$PY" -m pip install --no-deps --no-index --disable-pip-version-check -q --target "$PEERS_DIR" \
        third_party_wheels/*.whl > "$OUT/peers_install.txt" 2>&1
    PEERS_RC=$?
    set -e
    if [ "$PEERS_RC" -eq 0 ]; then
        export PYTHONPATH="$PYTHONPATH:$PEERS_DIR"
        echo "peers installed from third_party_wheels/ into $PEERS_DIR: $(ls third_party_wheels | tr '\n' ' ')"
    else
        echo "peers: install failed (exit $PEERS_RC, see peers_install.txt); the bench runs without them"
    fi
else
    echo "peers: no third_party_wheels/*.whl (bash benchmarks/fetch_peers.sh, then carry the folder): none timed"
fi

echo "== info"
set +e
timeout -k 5 60 "$PY" -m fused_ops info 2>&1 | tee "$OUT/info.txt"
INFO_RC=${PIPESTATUS[0]}
set -e
[ "$INFO_RC" -eq 0 ] || echo "fused_ops info failed (exit $INFO_RC)"
{ echo "== preflight (exit $PREFLIGHT_RC)"; cat "$OUT/preflight.txt"; } >> "$OUT/info.txt" 2>/dev/null || true
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

# run_tier NAME MARKER TIMEOUT PATHS...: one pytest tier over PATHS in that order (a file named before its folder
# runs first, once), every failure reported (no -x); its exit code in TIER_RC.
run_tier() {
    local name="$1" marker="$2" limit="$3"
    shift 3
    echo "== pytest -m $marker (after ${SECONDS}s; timeout ${limit}s)"
    if [ "$PYTEST_OK" -ne 1 ]; then
        echo "pytest does not import (see preflight.txt): the $name tier cannot run" | tee "$OUT/pytest_$name.txt"
        TIER_RC=127
        return
    fi
    set +e
    # SIGINT at the limit: pytest stops as on Ctrl-C and still prints its summary and writes the XML. Output goes
    # to a file, not a pipe: a forked test body that outlives an interrupted run would hold a pipe open.
    # --continue-on-collection-errors: pytest imports every module before it selects by marker, so a module that
    # cannot import here (an optional package the image lacks: hypothesis, numpy; see preflight.txt) must not
    # take the whole tier with it; its errors are still reported and still make the exit code non-zero.
    timeout -s INT -k 20 "$limit" "$PY" -m pytest -m "$marker" -q -ra -p no:cacheprovider --durations=10 \
        --continue-on-collection-errors \
        --junitxml="$OUT/pytest_$name.xml" "$@" > "$OUT/pytest_$name.txt" 2>&1 &
    local pid=$!
    wait "$pid"
    TIER_RC=$?
    # timeout runs pytest in a process group of its own (led by timeout, id $pid): end what is left in it.
    kill -KILL -- "-$pid" 2>/dev/null
    set -e
    cat "$OUT/pytest_$name.txt" || true
    echo "pytest -m $marker exit code: $TIER_RC"
}

# Time: the GPU tests at most 230 s (less when the steps before were slow), then the targets bench at most 100 s,
# and the quick bench what is left (at most 200 s, at least 60 s).
PYTEST_TIMEOUT=$((BUDGET_S - 100 - 60 - SECONDS))
PYTEST_TIMEOUT=$(( PYTEST_TIMEOUT > 230 ? 230 : PYTEST_TIMEOUT ))
PYTEST_TIMEOUT=$(( PYTEST_TIMEOUT < 60 ? 60 : PYTEST_TIMEOUT ))
# Three pytest processes, not one: a kernel fault (an illegal address) is a sticky CUDA error that fails every later
# CUDA call of its process, so one fault would read as every later test failing. The core kernels first, then the
# family's, then the GPU cases of the other files; each gets its share of what is left of the tier's time.
TESTS_END=$((SECONDS + PYTEST_TIMEOUT))
tier_limit() {  # tier_limit PERCENT: that share of the tier's time left, at least 30 s
    local left=$((TESTS_END - SECONDS))
    local limit=$((left * $1 / 100))
    echo $(( limit < 30 ? 30 : limit ))
}
TESTS_RC=0
run_tier gpu gpu "$(tier_limit 55)" tests/test_gpu.py
printf 'pytest_gpu=%s\n' "$TIER_RC" >> "$OUT/status.txt"
[ "$TIER_RC" -eq 0 ] || TESTS_RC=$TIER_RC
run_tier gpu_family gpu "$(tier_limit 50)" tests/test_gpu_family.py
printf 'pytest_gpu_family=%s\n' "$TIER_RC" >> "$OUT/status.txt"
[ "$TIER_RC" -eq 0 ] || TESTS_RC=$TIER_RC
run_tier gpu_rest gpu "$(tier_limit 100)" tests/ --ignore=tests/test_gpu.py --ignore=tests/test_gpu_family.py
printf 'pytest_gpu_rest=%s\n' "$TIER_RC" >> "$OUT/status.txt"
# (pytest exits 5 when it selects no test: not a failure of this tier)
[ "$TIER_RC" -eq 0 ] || [ "$TIER_RC" -eq 5 ] || TESTS_RC=$TIER_RC
# Without a CUDA device every GPU test skips and the tier exits 0: say so, so that a dry run's status.txt does not
# read as a GPU tier that passed.
if ! grep -q '^torch: ok.*CUDA [0-9].*, [1-9][0-9]* device(s)' "$OUT/preflight.txt" 2>/dev/null; then
    echo "no CUDA device: a dry run, the GPU tier skipped every test" | tee -a "$OUT/pytest_gpu.txt"
    printf 'gpu=none (a dry run: pytest_gpu=0 means every GPU test skipped)\n' >> "$OUT/status.txt"
fi

DEVICE="$(timeout -k 5 60 "$PY" -m fused_ops info --slug 2>/dev/null)" || DEVICE=""
DEVICE="$(printf '%s\n' "$DEVICE" | tail -n 1 | tr -cd 'a-z0-9-')" || DEVICE=""
DEVICE="${DEVICE:-unknown-device}"
STAMP="$(date -u +%Y%m%d)"
BASE="$OUT/bench_${DEVICE}_${STAMP}"
HAVE_PLOT=1
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    echo "matplotlib is not installed: no PNG this time"
    HAVE_PLOT=0
fi

# run_bench NAME JSON MAX_S ARGS...: one bench run (JSON rewritten after every case, PNG when matplotlib is there),
# at most MAX_S seconds and at least 60; its exit code in BENCH_RUN_RC.
run_bench() {
    local name="$1" json="$2" max_s="$3"
    shift 3
    local left=$((BUDGET_S - SECONDS))
    local limit=$(( left < max_s ? left : max_s ))
    limit=$(( limit < 60 ? 60 : limit ))
    local plot=()
    [ "$HAVE_PLOT" -eq 1 ] && plot=(--plot "${json%.json}.png")
    echo "== bench: $name (after ${SECONDS}s; timeout ${limit}s, budget $((limit - 45))s)"
    set +e
    timeout -k 15 "$limit" "$PY" -m fused_ops bench --quick --budget-s "$((limit - 45))" --json "$json" \
        ${plot[@]+"${plot[@]}"} "$@" 2>&1 | tee "$OUT/bench_$name.txt"
    BENCH_RUN_RC=${PIPESTATUS[0]}
    set -e
    echo "bench $name exit code: $BENCH_RUN_RC"
    [ -s "$json" ] || echo "no $json was written"
}

# 1. The optimizer family's targets first (issue 11): 8-bit AdamW against fp32 FusedAdamW and torch's fused AdamW
#    (bandwidth: GPT-2 shapes) and against torchao/bitsandbytes AdamW8bit (launch bound: 10,000 small tensors),
#    peers included when their wheels were carried (their cases come last within this run).
run_bench targets "${BASE}_targets.json" 100 --ops adamw8bit,adam --params small-10k,gpt2-124m --dtype bf16,fp32 \
    --providers fused_ops,torch-fused,torchao,bitsandbytes
TARGETS_RC=$BENCH_RUN_RC
printf 'bench_targets=%s\n' "$TARGETS_RC" >> "$OUT/status.txt"
# 2. The quick bench of every op (the source of the README's generated results section).
run_bench quick "$BASE.json" 200 --params gpt2-124m,small-10k --dtype fp32,bf16
BENCH_RC=$BENCH_RUN_RC
printf 'bench_quick=%s\n' "$BENCH_RC" >> "$OUT/status.txt"
[ "$TARGETS_RC" -eq 0 ] || BENCH_RC=$TARGETS_RC

printf 'bench=%s\nseconds=%s\n' "$BENCH_RC" "$SECONDS" >> "$OUT/status.txt"
cat "$OUT/status.txt" || true
ls -l "$OUT" || true
if [ "$PREFLIGHT_RC" -ne 0 ] || [ "$TESTS_RC" -ne 0 ] || [ "$BENCH_RC" -ne 0 ]; then
    exit 1
fi
