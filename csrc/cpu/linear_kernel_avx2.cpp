// layerskip::linear's kernel for AVX2 + FMA + F16C (Haswell, Zen 1 and later): 16 ymm registers, up to 4 input
// rows per pass and 8 accumulators. Built with its own target flags (not -march), chosen at run time by
// linear.cpp from cpuid.
// no-avx512f: the pragma adds to the build's -march (native), so without it GCC used zmm registers here on
// an AVX-512 build machine, and forcing this kernel there did not run what an AVX2-only CPU runs.
// tune=generic: the build's -march=native on this Zen 4 VM tunes for znver3, whose scheduling of these FMA
// chains ran the kernel at half speed for T >= 8 (benchmarks/linear_kernels_standalone.cpp, 44 vs 87 GFLOP/s).
#pragma GCC target("avx2,fma,f16c,no-avx512f,tune=generic")
#define LINEAR_ROWS_FN rows_avx2
#define LINEAR_ISA 256
#ifndef LINEAR_TOKENS
#define LINEAR_TOKENS 4
#endif
#ifndef LINEAR_ACCUMULATORS
#define LINEAR_ACCUMULATORS 8
#endif
#include "cpu/linear_kernel_simd.inc"
