// layerskip::linear's kernel for AVX-512 with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later): float32
// and float16 weights as the avx512 kernel (the same code, the same bits); bfloat16 weights meet the input rows
// rounded to bfloat16 in vdpbf16ps dot products (linear_kernel_bf16dot.inc) instead of widened float32
// multiply-adds. Built with its own target flags, chosen at run time by linear.cpp from cpuid.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,tune=generic")
#define LINEAR_ROWS_FN rows_avx512bf16
#define LINEAR_ISA 512
#define LINEAR_TOKENS 4
#define LINEAR_ONE_PASS 8
#define LINEAR_ACCUMULATORS 16
#define LINEAR_BF16_DOT 1
#include "cpu/linear_kernel_simd.inc"
