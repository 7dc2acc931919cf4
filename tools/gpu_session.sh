#!/usr/bin/env bash
# One session on a GPU machine, in the order that matters when machine time is short: build both
# extensions, run the GPU tests, time the step. Each stage has its own time limit and writes its
# full log under $OUT (default ./gpu_out), so a stage that runs out of time still leaves its
# output; the end of the console output is a short summary.
#
#   tools/gpu_session.sh [STAGE...]    stages: env build tests bench suite (default: env build tests bench)
#
#   TESTS="tests/..."   test selection for the tests stage (default: every GPU test)
#   SUITE="...", SUITE_K="..."   files and -k expression of the suite stage (default: tests, all)
#   BENCH_ARGS="..."    arguments of benchmarks/bench_step.py for the bench stage
#   *_LIMIT             seconds for a stage (BUILD_LIMIT, TESTS_LIMIT, BENCH_LIMIT, SUITE_LIMIT)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STAGES=${*:-env build tests bench}
SUMMARY=$OUT/summary.txt
: >>"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# pytest-xdist spreads the table over the cores (Triton's compile is CPU-bound); SIGINT at the
# stage's limit makes pytest stop and still print which tests failed so far.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short --durations=10)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "${WORKERS:-8}"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout 240); fi

run_stage() {  # name limit command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    note "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
    return $rc
}

for stage in $STAGES; do
    case $stage in
    env)
        { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
          nvcc --version | tail -1
          "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
        } 2>&1 | tee -a "$SUMMARY"
        ;;
    build)
        BREGMAN_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
            run_stage build "${BUILD_LIMIT:-300}" "$PY" setup.py build_ext --inplace || { tail -40 "$OUT/build.log"; exit 1; }
        # tests/test_build.py runs this check on the CPU, so that it cannot rot between GPU sessions
        "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
from bregman_fused.backends import unavailable_reason
from bregman_fused.regularizers import NoReg
for backend in ("cuda", "triton"):
    print(f"{backend} on cuda:", unavailable_reason(backend, torch.device("cuda"), NoReg()) or "available")
EOF
        [ "${PIPESTATUS[0]}" -eq 0 ] || { note "== build: the availability check failed"; exit 1; }
        ;;
    tests)
        # shellcheck disable=SC2086
        run_stage tests "${TESTS_LIMIT:-300}" "${PYTEST[@]}" --junitxml="$OUT/tests.xml" \
            ${TESTS:-tests/test_cuda_backend.py tests/test_capturable.py tests/test_layout.py tests/test_triton_backend.py tests/test_backends.py tests/test_shared_behaviour.py tests/test_compile.py tests/test_compact_moments.py -k "not cpu_matches and not interpreter"}
        grep -E "passed|failed|error" "$OUT/tests.log" | tail -3 | tee -a "$SUMMARY"
        grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -40 | tee -a "$SUMMARY"
        ;;
    suite)  # everything else: the CPU tests, distributed, training, with a GPU present
        # shellcheck disable=SC2086
        run_stage suite "${SUITE_LIMIT:-300}" "${PYTEST[@]}" --junitxml="$OUT/suite.xml" ${SUITE:-tests} ${SUITE_K:+-k "$SUITE_K"}
        grep -E "passed|failed|error" "$OUT/suite.log" | tail -3 | tee -a "$SUMMARY"
        grep -E "^(FAILED|ERROR) " "$OUT/suite.log" | head -40 | tee -a "$SUMMARY"
        ;;
    bench)
        # shellcheck disable=SC2086
        run_stage bench "${BENCH_LIMIT:-200}" "$PY" benchmarks/bench_step.py --csv "$OUT/bench.csv" \
            ${BENCH_ARGS:---workloads list-100m,resnet18 --providers cuda,triton,torch-adam-fused,copy,reference --optimizers linbreg,linbreg-momentum,adabreg,proxsgd,adabreg-bf16,adabreg-8bit,linbreg-momentum-bf16,linbreg-momentum-8bit}
        tail -60 "$OUT/bench.log"
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
echo "----- summary"
cat "$SUMMARY"
