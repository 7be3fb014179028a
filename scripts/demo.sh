#!/usr/bin/env bash
# Installs everything, then generates with the default model: self-speculative decoding, printing the text,
# tokens/s and the acceptance rate. Extra arguments go to `layerskip-ext generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
cd /tmp  # import the installed package, not the source tree
"$PY" -m layerskip_ext.cli generate --max-new-tokens 128 "$@"
