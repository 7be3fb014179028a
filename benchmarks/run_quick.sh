#!/usr/bin/env bash
# Quick mode of every benchmark (CI): prints the tables, asserts nothing about time.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
for bench in bench_ops.py bench_linear.py bench_generate.py bench_batch.py; do
  echo "=== benchmarks/$bench --quick"
  "$PY" "$bench" --quick
done
echo "=== layerskip-ext bench on the LayerSkip demo checkpoint (checkpoints/layerskip-demo)"
"$PY" -m layerskip_ext.cli bench --model "$PWD/../checkpoints/layerskip-demo" --exit-layer 3 --num-speculations 2 \
  --max-new-tokens 64 --repeats 3 --prompt "It is a truth universally acknowledged, that"
