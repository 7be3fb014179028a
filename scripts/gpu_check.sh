#!/usr/bin/env bash
# The one command of a GPU check (a machine with an NVIDIA GPU, nvcc and a CUDA build of torch; no internet):
# builds the extension in place with its CUDA kernels, checks the CUDA registrations, runs the CUDA tests, then the
# GPU benchmarks on a small random model and on the demo checkpoint. Prints everything; about 6 minutes on an H200
# with 16 cores. Exit code: non-zero when the build or the tests fail (the benchmarks run regardless).
#   bash scripts/gpu_check.sh                 # MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 by default
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LAYERSKIP_CUDA=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }
status=0

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -n 2
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

stage "build in place (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! "$PY" setup.py -q build_ext --inplace > build_gpu_check.log 2>&1; then
  tail -n 80 build_gpu_check.log
  echo "gpu_check: BUILD FAILED"
  exit 1
fi
grep -iE "warning" build_gpu_check.log | grep -v "Warning: Unused\|UserWarning" | head -n 20

stage "CUDA registrations"
"$PY" scripts/check_cuda_build.py || status=1

stage "CUDA tests (pytest -m cuda)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs --durations=5 tests/test_cuda_ops.py tests/test_ops.py \
  tests/test_engine_devices.py || status=1

stage "benchmark: random 12-layer model (hidden 1024, vocab 32000)"
timeout 120 "$PY" benchmarks/bench_cuda.py --device cuda --tokens 128 --repeats 3 || echo "(benchmark failed)"

stage "benchmark: demo checkpoint (checkpoints/layerskip-demo, E=3 d=2)"
timeout 60 "$PY" benchmarks/bench_cuda.py --device cuda --model checkpoints/layerskip-demo --exit-layer 3 -d 2 \
  --tokens 128 --repeats 3 --weight-dtype float32 || echo "(benchmark failed)"

stage "done, status $status"
exit $status
