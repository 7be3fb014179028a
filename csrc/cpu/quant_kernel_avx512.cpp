// linear_quantized's kernel for AVX-512 F/BW/VL without VNNI (Skylake-X): the 256-bit code with 32 registers, 16
// input rows per pass.
// Built with its own target flags (not -march), chosen at run time by quant_linear.cpp from cpuid.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define QUANT_ROWS_FN rows_avx512
#define QUANT_TOKENS 16
#define QUANT_ACCUMULATORS 16
#define QUANT_ZMM 1
#define QUANT_VNNI 0
#include "cpu/quant_kernel_simd.inc"
