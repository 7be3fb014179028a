// layerskip::linear's portable kernel (CPUs without AVX2): the SIMD kernel's structure on 8 scalar lanes, so
// the compiler may vectorize it for whatever the build targets. Chosen at run time by linear.cpp.
// Multiply and add stay two roundings here (no contraction into fused multiply-adds, which the compiler would
// otherwise apply to some template instances and not others, and batch invariance needs one arithmetic).
#pragma GCC optimize("fp-contract=off")
#define LINEAR_ROWS_FN rows_plain
#define LINEAR_ISA 0
#define LINEAR_TOKENS 4
#define LINEAR_ACCUMULATORS 8
#include "cpu/linear_kernel_simd.inc"
