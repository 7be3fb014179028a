#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (LAYERSKIP_SANITIZE=1 in setup.py)
# into build/sanitize/ (the normal build is left alone) and runs the op, engine and fuzz tests against it.
# Any sanitizer report aborts the test process, so this script fails on the first one.
#   bash scripts/sanitize.sh                        # the default subset (SANITIZE_TESTS)
#   bash scripts/sanitize.sh tests/test_ops.py -k attention
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=build/sanitize
mkdir -p "$OUT"
start=$(date +%s)

echo "=== building the sanitized extension in $OUT"
LAYERSKIP_SANITIZE=1 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" >"$OUT/build.log" 2>&1 ||
  { tail -50 "$OUT/build.log"; exit 1; }
# a package tree that is the sources plus the sanitized _C
rm -rf "$OUT/pkg" && mkdir -p "$OUT/pkg/layerskip_ext"
cp python/layerskip_ext/*.py "$OUT/pkg/layerskip_ext/"
cp -r training "$OUT/pkg/layerskip_ext/training"
cp "$OUT"/lib/layerskip_ext/_C*.so "$OUT/pkg/layerskip_ext/"
echo "built in $(( $(date +%s) - start )) s"

# python is not instrumented: the ASan runtime must come first; leaks are Python's business, not ours
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$OUT/pkg" OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2
"$PY" -c "import layerskip_ext, sys; assert layerskip_ext.__file__.startswith('$PWD/$OUT'), layerskip_ext.__file__"

SANITIZE_TESTS=${SANITIZE_TESTS:-"tests/test_ops.py tests/test_hostile_args.py tests/test_fuzz_generate.py"}
[ $# -gt 0 ] && SANITIZE_TESTS="$*"
echo "=== pytest under ASan + UBSan: $SANITIZE_TESTS"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider -x $SANITIZE_TESTS
echo "sanitizers: clean in $(( $(date +%s) - start )) s"
