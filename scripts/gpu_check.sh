#!/usr/bin/env bash
# The one command of a GPU check (a machine with an NVIDIA GPU, nvcc and a CUDA build of torch; no internet):
# builds the extension in place with its CUDA kernels, checks the CUDA registrations, runs the CUDA tests, then the
# GPU benchmarks on a small random model and on the demo checkpoint. Prints everything; about 6 minutes on an H200
# with 16 cores. Exit code: non-zero when the build or the tests fail (the benchmarks run regardless). Logs (build,
# tests with JUnit XML, benchmarks) go to $LOGS (default: $OUT where set, else gpu_check_logs/).
#   bash scripts/gpu_check.sh                 # MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 by default
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LAYERSKIP_CUDA=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
LOGS=${LOGS:-${OUT:-gpu_check_logs}}
mkdir -p "$LOGS"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }
status=0

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -n 2
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

stage "build in place (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! "$PY" setup.py -q build_ext --inplace > "$LOGS/build.log" 2>&1; then
  grep -n -B2 -A6 "error" "$LOGS/build.log" | head -n 120
  echo "gpu_check: BUILD FAILED"
  exit 1
fi
grep -iE "warning" "$LOGS/build.log" | grep -v "Warning: Unused\|UserWarning" | head -n 20

stage "CUDA registrations"
"$PY" scripts/check_cuda_build.py || status=1

stage "CUDA tests (pytest -m cuda)"
# per-test limit where pytest-timeout is installed: a hung kernel fails its test instead of the whole check
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
timeout 170 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rfEs --tb=short --durations=8 $per_test \
  --junitxml="$LOGS/cuda_tests.xml" tests/test_cuda_ops.py tests/test_ops.py tests/test_engine_devices.py \
  > "$LOGS/cuda_tests.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$LOGS/cuda_tests.log" | tail -n 60

stage "benchmark: random 12-layer model (hidden 1024, vocab 32000)"
timeout 100 "$PY" benchmarks/bench_cuda.py --device cuda --tokens 128 --repeats 3 2>&1 | tee "$LOGS/bench_random.log" \
  || echo "(benchmark failed)"

stage "benchmark: demo checkpoint (checkpoints/layerskip-demo, E=3 d=2)"
timeout 45 "$PY" benchmarks/bench_cuda.py --device cuda --model checkpoints/layerskip-demo --exit-layer 3 -d 2 \
  --tokens 128 --repeats 3 --weight-dtype float32 2>&1 | tee "$LOGS/bench_demo.log" || echo "(benchmark failed)"

stage "benchmark: linear against cuBLAS"
timeout 40 "$PY" benchmarks/bench_cuda_linear.py 2>&1 | tee "$LOGS/bench_linear.log" || echo "(benchmark failed)"

stage "done, status $status"
exit $status
