#!/usr/bin/env bash
# CI check of the CUDA build on a machine without a GPU: creates (once) a virtual environment with the CUDA 13
# build of torch 2.14.1 from local disk, builds layerskip_ext with its CUDA kernels (fails when nvcc or the C++
# compiler fails), imports it and checks that every op of the library has a CUDA kernel registered
# (scripts/check_cuda_build.py). Prints the wall time of each stage.
#   bash scripts/build_cuda.sh                       # venv in $LAYERSKIP_CUDA_VENV (default: see VENV below)
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2        # (the defaults)
# Without nvcc on the machine it says so and exits 0 (there is nothing to compile the kernels with).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# the venv: LAYERSKIP_CUDA_VENV, else /work/venvs/cuda-torch on our machines, else under ~/.cache
if [ -d /work/venvs ]; then DEFAULT_VENV=/work/venvs/cuda-torch; else DEFAULT_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/layerskip/cuda-torch; fi
VENV=${LAYERSKIP_CUDA_VENV:-$DEFAULT_VENV}
TORCH_VERSION=2.14.1
start=$(date +%s)
stage() { echo "--- $1 ($(( $(date +%s) - start )) s)"; }

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "build_cuda: SKIPPED, no nvcc on this machine (the CUDA kernels cannot be compiled here)"
  exit 0
fi

stage "virtual environment $VENV"
# torch's version.py read without importing torch (an import takes a minute on a loaded machine)
has_cuda_torch() {
  "$VENV/bin/python" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import importlib.util, os, re, sys
spec = importlib.util.find_spec("torch")
text = open(os.path.join(os.path.dirname(spec.origin), "version.py")).read()
version = re.search(r"__version__ = .(\S+?).$", text, re.M).group(1)
cuda = re.search(r"^cuda: .*= '([^']+)'", text, re.M)
sys.exit(0 if version.startswith(sys.argv[1]) and cuda else 1)
PY
}
if ! has_cuda_torch; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q "torch==$TORCH_VERSION" setuptools wheel ninja numpy
fi

# What CI checks here: the op schemas with every CUDA kernel and its torch glue (LAYERSKIP_CUDA_OPS_ONLY=1: the
# CPU kernels and the engine are built by the CPU build already; rebuilding them against this torch would take
# most of the time), plus a compile of the engine's CUDA-graph code. `pip install .` on a CUDA machine and
# scripts/gpu_check.sh build everything together.
stage "build the CUDA op library (MAX_JOBS=${MAX_JOBS:-2}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
# ccache (when installed) with paths relative to the checkout, so that a fresh clone elsewhere hits the cache
if [ -z "${CXX:-}" ] && [ -x /usr/lib/ccache/g++ ]; then export CXX=/usr/lib/ccache/g++; fi
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT} CCACHE_NOHASHDIR=1
export MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} LAYERSKIP_CUDA=1
BUILD=build/cuda
mkdir -p build
LAYERSKIP_CUDA_OPS_ONLY=1 "$VENV/bin/python" setup.py -q build --build-base "$BUILD" > "$BUILD.log" 2>&1 || {
  tail -n 60 "$BUILD.log"
  echo "build_cuda: FAILED, the CUDA build did not compile (full log: $BUILD.log)"
  exit 1
}
LIB=$(ls -d "$BUILD"/lib.* | head -n 1)

stage "compile the engine's CUDA-graph code against this torch"
# nvcc may be a wrapper script (as here): name the toolkit, for torch's include paths and ours
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/include ]; then export CUDA_HOME=/usr/local/cuda; fi
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
INCLUDES=$("$VENV/bin/python" - <<'PY'
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths("cuda")))
PY
)
"${CXX:-g++}" -std=c++20 -fsyntax-only -DLAYERSKIP_WITH_CUDA=1 -Icsrc $INCLUDES -I"$CUDA_INC" \
  csrc/engine/cuda_graphs.cpp || { echo "build_cuda: FAILED, csrc/engine/cuda_graphs.cpp did not compile"; exit 1; }

stage "import and check the CUDA registrations"
PYTHONPATH="$ROOT/$LIB" "$VENV/bin/python" scripts/check_cuda_build.py --cuda-only "$ROOT/$LIB"
stage "done"
