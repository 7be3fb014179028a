#!/usr/bin/env bash
# Installs layerskip_ext with its test dependencies and runs the whole test suite, the C++ tests (ctest)
# and the quick benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=test bash scripts/install.sh
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
