// linear_quantized's kernel for AVX2 + FMA + F16C (Zen 3, Haswell and later): 16 ymm registers, 8 input rows per
// pass, vpmaddubsw + vpmaddwd.
// Built with its own target flags (not -march), chosen at run time by quant_linear.cpp from cpuid.
#pragma GCC target("avx2,fma,f16c")
#define QUANT_ROWS_FN rows_avx2
#define QUANT_TOKENS 8
#define QUANT_ACCUMULATORS 8
#define QUANT_ZMM 0
#define QUANT_VNNI 0
#include "cpu/quant_kernel_simd.inc"
