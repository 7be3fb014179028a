// layerskip::linear's kernel for AVX-512 F (Skylake-X, Zen 4 and later): 32 zmm registers, up to 4 input rows
// per pass and 16 accumulators. Built with its own target flags (not -march), chosen at run time by linear.cpp
// from cpuid.
#pragma GCC target("avx512f,avx2,fma,f16c")
#ifndef LINEAR_ROWS_FN
#define LINEAR_ROWS_FN rows_avx512
#endif
#define LINEAR_ISA 512
#ifndef LINEAR_TOKENS
#define LINEAR_TOKENS 4
#endif
#ifndef LINEAR_ACCUMULATORS
#define LINEAR_ACCUMULATORS 16
#endif
#include "cpu/linear_kernel_simd.inc"
