#!/usr/bin/env bash
# Installs layerskip_ext with its test dependencies, builds and runs the C++ tests (ctest), prints the quick
# benchmarks, checks the CUDA build (scripts/build_cuda.sh), then runs the whole pytest suite (last, so its summary
# closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=test bash scripts/install.sh

echo "=== C++ tests (CMake + ctest)"
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build build/cmake -j 2
ctest --test-dir build/cmake --output-on-failure

echo "=== CUDA build (nvcc, CUDA 13 torch in a second venv; no GPU needed)"
bash scripts/build_cuda.sh

echo "=== quick benchmarks"
PYTHON="$PY" bash benchmarks/run_quick.sh

echo "=== pytest"
# OpenMP workers wait as layerskip_ext sets it (spin ~0.1 ms, then sleep) unless OMP_WAIT_POLICY / GOMP_SPINCOUNT is set
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
