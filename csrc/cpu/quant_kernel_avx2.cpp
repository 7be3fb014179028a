// linear_quantized's kernel for AVX2 + FMA + F16C (Zen 3, Haswell and later): 16 ymm registers, 8 input rows per
// pass, vpmaddubsw + vpmaddwd.
// Built with its own target flags (not -march), chosen at run time by quant_linear.cpp from cpuid.
// no-avx512f: the pragma adds to the build's -march (native), so without it GCC used zmm registers here on
// an AVX-512 build machine, and forcing this kernel there did not run what an AVX2-only CPU runs.
#pragma GCC target("avx2,fma,f16c,no-avx512f")
#define QUANT_ROWS_FN rows_avx2
#define QUANT_TOKENS 8
#define QUANT_ACCUMULATORS 8
#define QUANT_ZMM 0
#define QUANT_VNNI 0
#include "cpu/quant_kernel_simd.inc"
