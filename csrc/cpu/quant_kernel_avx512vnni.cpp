// linear_quantized's kernel for AVX-512 VNNI (Zen 4, Ice Lake and later): one vpdpbusd per block and input row,
// 16 input rows per pass.
// Built with its own target flags (not -march), chosen at run time by quant_linear.cpp from cpuid.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#define QUANT_ROWS_FN rows_avx512vnni
#define QUANT_TOKENS 16
#define QUANT_ACCUMULATORS 16
#define QUANT_ZMM 1
#define QUANT_VNNI 1
#include "cpu/quant_kernel_simd.inc"
