// layerskip::linear's kernel for AVX-512 F (Skylake-X, Zen 4 and later): 32 zmm registers, up to 4 input rows
// per pass and 16 accumulators. Built with its own target flags (not -march), chosen at run time by linear.cpp
// from cpuid.
// tune=generic: the build's -march=native on this Zen 4 VM tunes for znver3, whose scheduling of these FMA
// chains ran the kernel at half speed for T >= 8 (benchmarks/linear_kernels_standalone.cpp, 44 vs 87 GFLOP/s).
#pragma GCC target("avx512f,avx2,fma,f16c,tune=generic")
#ifndef LINEAR_ROWS_FN
#define LINEAR_ROWS_FN rows_avx512
#endif
#define LINEAR_ISA 512
#ifndef LINEAR_TOKENS
#define LINEAR_TOKENS 4
#endif
#ifndef LINEAR_ONE_PASS
#define LINEAR_ONE_PASS 8  // up to 8 rows in one pass: weights stream while the FMAs run
#endif
#ifndef LINEAR_ACCUMULATORS
#define LINEAR_ACCUMULATORS 16
#endif
#include "cpu/linear_kernel_simd.inc"
