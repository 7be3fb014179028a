// layerskip::linear's kernel for AVX2 + FMA + F16C (Haswell, Zen 1 and later): 16 ymm registers, up to 4 input
// rows per pass and 8 accumulators. Built with its own target flags (not -march), chosen at run time by
// linear.cpp from cpuid.
#pragma GCC target("avx2,fma,f16c")
#define LINEAR_ROWS_FN rows_avx2
#define LINEAR_ISA 256
#ifndef LINEAR_TOKENS
#define LINEAR_TOKENS 4
#endif
#ifndef LINEAR_ACCUMULATORS
#define LINEAR_ACCUMULATORS 8
#endif
#include "cpu/linear_kernel_simd.inc"
