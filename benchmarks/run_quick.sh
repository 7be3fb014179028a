#!/usr/bin/env bash
# Quick mode of every benchmark (CI): prints the tables, asserts nothing about time.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
for bench in bench_ops.py bench_linear.py bench_generate.py; do
  if [ -f "$bench" ]; then
    echo "=== benchmarks/$bench --quick"
    "$PY" "$bench" --quick
  fi
done
