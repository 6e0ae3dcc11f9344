#!/usr/bin/env bash
# One-shot validation of tinynorm on a GPU machine, offline, in at most 8 minutes.
#
#   bash experiments/gpu_check.sh            # from anywhere; OUT=dir is where results go
#
# The lent H200 (see the README's GPU section) has CuPy 14 and the cuDNN library but
# not NVIDIA's cuDNN frontend, and no network.  Fetch its wheel here first (Python
# 3.12, 11 MiB; wheels/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d wheels nvidia-cudnn-frontend==1.32.0
# then make the device call with command "bash experiments/gpu_check.sh" and carry
# ["wheels"].
#
# Sections, the fastest and most telling first, each under its own timeout (SIGINT:
# Python prints where it was, pytest its summary and junit file; SIGKILL 20 s later),
# all under one overall budget, so that one hang cannot eat the rest:
#   wheels    pip install --no-index --no-deps every wheels/*.whl (GPU_CHECK_WHEELS=dir
#             for another folder) into a scratch folder on PYTHONPATH
#   install   pip install --no-index --no-deps -e . (offline); PYTHONPATH holds this tree
#             either way, so the code under test is this working tree's
#   versions  tinynorm info, the CuPy / cuDNN / NCCL / torch packages, whether the cuDNN
#             frontend imports (and from where), nvidia-smi
#   detect    stops here (exit 3, said in the summary) when no GPU is usable
#   convs     one convolution per path (cudnn, generic) and dtype vs the CPU in float64
#   compare   one training step of every model and norm, float32 GPU vs float64 CPU
#   bench     cifar10-nv and ResNet-50 (ImageNet stem, 224x224) training steps against
#             PyTorch + cuDNN, TF32 off on both sides; BN's share of the ResNet-50 step
#   tests     every test marked gpu, -v (each name logged as it starts), per-test
#             timeouts, junit XML; TINYNORM_REQUIRE_GPU=1 (a skip is a failure)
# TINYNORM_REQUIRE_CUDNN=1 throughout: a GPU convolution that does not run cuDNN fails.
# GPU_CHECK_INSTALL=0 skips the install (it repoints an existing editable install of
# tinynorm at this tree); GPU_CHECK_BUDGET=seconds changes the overall budget.
#
# Files ($OUT, default runs/gpu_check; the device tool returns at most 8 files, 16 MiB
# each, so everything goes into two):
#   gpu_check_summary.txt   the summary, also on stdout, written as the run goes
#   gpu_check_logs.tar.gz   every finished section's log (and its JSON / junit XML),
#                           rewritten after each section; logs over 4 MiB keep their
#                           first 1 MiB and last 3 MiB
# plus, only while a section runs, that section's own files (moved into the archive
# when it ends: a run killed from outside still leaves the log it was writing).
# Exit status: 0 all passed, 3 no GPU, 1 a section failed or timed out.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/gpu_check_summary.txt"
ARCHIVE="$OUT_DIR/gpu_check_logs.tar.gz"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/wheels}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-470}"          # seconds for everything (8 minutes, some slack)
START=$(date +%s)
# scratch, outside $OUT: the finished logs (archived from here) and the installed wheels
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
SITE="$WORK/site"
mkdir -p "$LOGS" "$SITE"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# a GPU convolution on the generic fallback fails instead of passing unnoticed; CuPy's
# matmuls stay float32 (TF32 only under CUPY_TF32=1), as cuDNN's do (allow_tf32 off)
export TINYNORM_REQUIRE_CUDNN=1 CUPY_TF32=0
FAILED=0
rm -f "$ARCHIVE"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# cap FILE: at most 4 MiB (its first 1 MiB and last 3 MiB), so the archive stays far
# below the tool's 16 MiB a file
cap() {
    local size
    size=$(stat -c %s "$1")
    if (( size > 4 * 1024 * 1024 )); then
        { head -c 1M "$1"; printf '\n[... gpu_check: %s bytes cut here ...]\n' "$size"
          tail -c 3M "$1"; } > "$1.cut" && mv -f "$1.cut" "$1"
    fi
}

# archive NAME: move NAME.* (log, JSON, XML) from $OUT into the scratch logs and
# rewrite the archive of all finished sections
archive() {
    local f
    for f in "$OUT_DIR/$1".*; do
        [ -f "$f" ] || continue
        mv -f "$f" "$LOGS/" && cap "$LOGS/$(basename "$f")"
    done
    tar -czf "$ARCHIVE.tmp" -C "$LOGS" . && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

# section NAME LIMIT_SECONDS COMMAND...: run with min(LIMIT, what is left of BUDGET);
# its output goes to $OUT/NAME.log while it runs, to $LOGS/NAME.log (and the archive) after
section() {
    local name=$1 limit=$2 left rc t0 took
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
    timeout -s INT -k 20 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - t0 ))
    archive "$name"
    if (( rc == 124 || rc == 137 )); then
        say "[$name] TIMED OUT after ${took}s (limit ${limit}s); log: $name.log in $ARCHIVE"
    elif (( rc == 0 )); then
        say "[$name] ok (${took}s)"
    else
        say "[$name] FAILED with status $rc (${took}s); log: $name.log in $ARCHIVE"
    fi
    return $rc
}

# excerpt NAME LINES: the last LINES lines of a finished section's log, indented
excerpt() {
    [ -f "$LOGS/$1.log" ] && tail -n "$2" "$LOGS/$1.log" | sed 's/^/  /' | tee -a "$SUMMARY"
}

say "tinynorm gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), tree $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git')); results in $OUT_DIR"

# -- wheels carried to an offline machine (the cuDNN frontend), installed without network
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
    if section wheels 60 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" "${wheels[@]}"; then
        say "  installed into $SITE (on PYTHONPATH): $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    else
        FAILED=1
    fi
else
    say "[wheels] none in $WHEELS: the cuDNN frontend must be installed already"
fi

# -- install (offline); a failure here is reported, the PYTHONPATH copy is tested anyway
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
    section install 90 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || say "  (pip install failed: testing the tree through PYTHONPATH)"
else
    say "[install] skipped (GPU_CHECK_INSTALL=0): testing the tree through PYTHONPATH"
fi

# -- versions
section versions 60 "$PY" experiments/gpu_check.py versions --json "$OUT_DIR/versions.json"
excerpt versions 40

# -- detect: without a usable GPU there is nothing more to check
"$PY" -c "import sys; from tinynorm import backend; sys.exit(0 if backend.gpu_available() else 3)" \
    > "$OUT_DIR/detect.log" 2>&1
detected=$?
archive detect
if (( detected != 0 )); then
    say "[detect] NO GPU: $("$PY" -c 'from tinynorm import backend; print(backend._gpu_unusable_reason() or "cupy.is_available() is False")' 2>&1 | tail -n 1)"
    say "nothing was run on a GPU; summary: $SUMMARY, logs: $ARCHIVE"
    exit 3
fi
say "[detect] GPU usable"

# -- one convolution per path against the CPU (cuDNN required)
section convs 60 "$PY" experiments/gpu_check.py convs --json "$OUT_DIR/convs.json" || FAILED=1
excerpt convs 20

# -- a training step of each model, GPU vs CPU
section compare 90 "$PY" experiments/gpu_check.py compare --json "$OUT_DIR/compare.json" \
    || FAILED=1
excerpt compare 16

# -- tinynorm against PyTorch + cuDNN on this GPU; BN's share of the ResNet-50 step
section bench 150 "$PY" experiments/gpu_check.py bench --json "$OUT_DIR/bench.json" || FAILED=1
excerpt bench 20

# -- every gpu-marked test, last: it takes what is left of the budget.  -v logs each
# name as the test starts (a hang shows which); faulthandler_timeout dumps every
# thread's stack for a test past 60 s, TINYNORM_TEST_TIMEOUT fails one past 90 s
# (tests/conftest.py) and the run goes on; SIGINT at the limit still writes the
# summary and the junit XML
section tests 600 env TINYNORM_REQUIRE_GPU=1 TINYNORM_TEST_TIMEOUT=90 \
    "$PY" -m pytest -m gpu -p no:cacheprovider -v -rfEs --durations=10 \
    -o faulthandler_timeout=60 --junitxml="$OUT_DIR/tests.xml" \
    tests/test_gpu.py tests/test_conv.py tests/test_conv_plan.py tests/test_ops_core.py \
    tests/test_norm_ops.py
rc=$?
(( rc != 0 )) && FAILED=1
if [ -f "$LOGS/tests.log" ]; then
    if (( rc == 124 || rc == 137 )); then
        # -v wrote the name of the test that was running; pytest, where SIGINT found it
        say "  running when stopped: $(grep -E '^[^ ]*::[^ ]+' "$LOGS/tests.log" | tail -n 1 \
            | cut -c1-200)"
        say "  stopped at: $(grep -A 1 -E '^!+ KeyboardInterrupt !+$' "$LOGS/tests.log" \
            | tail -n 1 | cut -c1-200)"
    fi
    grep -E "(passed|failed|error|interrupted).* in [0-9.]+s" "$LOGS/tests.log" | tail -n 1 \
        | sed 's/^/  /' | tee -a "$SUMMARY"
    grep -E "^(FAILED|ERROR) " "$LOGS/tests.log" | head -n 25 | cut -c1-300 | sed 's/^/  /' \
        | tee -a "$SUMMARY"
fi

say "total $(( $(date +%s) - START ))s; $([ $FAILED = 0 ] && echo 'every section passed' || echo 'SOME SECTION FAILED'); summary: $SUMMARY, logs: $ARCHIVE"
exit $FAILED
