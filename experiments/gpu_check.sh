#!/usr/bin/env bash
# One-shot validation of tinynorm on a GPU machine, offline, in at most 8 minutes.
#
#   bash experiments/gpu_check.sh            # from anywhere; OUT=dir keeps the logs there
#
# Sections (each under its own timeout, all under one overall budget, so one hang
# cannot eat the rest):
#   install   pip install --no-index --no-deps -e . (offline); PYTHONPATH is set to this
#             tree either way, so the code under test is this working tree's
#   versions  tinynorm info: NumPy, numba, CuPy, CUDA, cuDNN and the GPU conv path
#   detect    stops here (exit 3, said in the summary) when no GPU is usable
#   tests     every test marked gpu, with TINYNORM_REQUIRE_GPU=1 (a skip is a failure)
#   compare   one training step of every model and norm, float32 GPU vs float64 CPU
#   bench     a cifar10-nv and a ResNet-50 step; one 3x3 conv against torch's cuDNN
# GPU_CHECK_INSTALL=0 skips the install (it repoints an existing editable install of
# tinynorm at this tree).  The summary goes to stdout and to $OUT/gpu_check_summary.txt (OUT defaults to
# runs/gpu_check); each section's full output to $OUT/<section>.log.
# Exit status: 0 all passed, 3 no GPU, 1 a section failed or timed out.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/gpu_check_summary.txt"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-470}"          # seconds for everything (8 minutes, some slack)
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
FAILED=0
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# section NAME LIMIT_SECONDS COMMAND...: run with min(LIMIT, what is left of BUDGET)
section() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 10 )); then
        say "[$name] SKIPPED: the overall budget of ${BUDGET}s is spent"
        FAILED=1
        return 99
    fi
    (( limit > left )) && limit=$left
    t0=$(date +%s)
    echo "== $name (at most ${limit}s) ==" >&2
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 )); then
        say "[$name] TIMED OUT after ${took}s (limit ${limit}s); log: $OUT_DIR/$name.log"
    elif (( rc == 0 )); then
        say "[$name] ok (${took}s)"
    else
        say "[$name] FAILED with status $rc (${took}s); log: $OUT_DIR/$name.log"
    fi
    return $rc
}

say "tinynorm gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), tree $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

# -- install (offline); a failure here is reported, the PYTHONPATH copy is tested anyway
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
    section install 90 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || say "  (pip install failed: testing the tree through PYTHONPATH)"
else
    say "[install] skipped (GPU_CHECK_INSTALL=0): testing the tree through PYTHONPATH"
fi

# -- versions
section versions 60 bash -c "\"$PY\" -m tinynorm info; \"$PY\" -m pip list 2>/dev/null | grep -i -E '^(cupy|nvidia-cudnn|numpy|numba|torch) '; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true"
sed 's/^/  /' "$OUT_DIR/versions.log" | tee -a "$SUMMARY"

# -- detect: without a usable GPU there is nothing more to check
if ! "$PY" -c "import sys; from tinynorm import backend; sys.exit(0 if backend.gpu_available() else 3)" \
        > "$OUT_DIR/detect.log" 2>&1; then
    say "[detect] NO GPU: $("$PY" -c 'from tinynorm import backend; print(backend._gpu_unusable_reason() or "cupy.is_available() is False")' 2>&1 | tail -n 1)"
    say "nothing was run on a GPU; summary: $SUMMARY"
    exit 3
fi
say "[detect] GPU usable"

# -- every gpu-marked test; a skip would be a failure (TINYNORM_REQUIRE_GPU=1)
section tests 230 env TINYNORM_REQUIRE_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    -rfE --durations=8 --junitxml="$OUT_DIR/gpu_tests.xml" \
    tests/test_gpu.py tests/test_conv.py tests/test_conv_plan.py tests/test_ops_core.py \
    tests/test_norm_ops.py || FAILED=1
grep -E "passed|failed|error" "$OUT_DIR/tests.log" | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | head -n 25 | sed 's/^/  /' | tee -a "$SUMMARY"

# -- a training step of each model, GPU vs CPU
section compare 60 "$PY" experiments/gpu_check.py compare --json "$OUT_DIR/compare.json" \
    || FAILED=1
sed 's/^/  /' "$OUT_DIR/compare.log" | tail -n 16 | tee -a "$SUMMARY"

# -- a small benchmark
section bench 100 "$PY" experiments/gpu_check.py bench --json "$OUT_DIR/bench.json" || FAILED=1
sed 's/^/  /' "$OUT_DIR/bench.log" | tail -n 6 | tee -a "$SUMMARY"

say "total $(( $(date +%s) - START ))s; $([ $FAILED = 0 ] && echo 'every section passed' || echo 'SOME SECTION FAILED'); summary: $SUMMARY"
exit $FAILED
