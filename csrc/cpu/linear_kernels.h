// Dense float32 / bfloat16 / float16 weights against float32 activations: the shared declarations of the
// kernels of layerskip::linear (csrc/cpu/linear.cpp) for up to kLinearSkinnyMaxTokens input rows, and their
// per-ISA builds (linear_kernel_avx512.cpp, linear_kernel_avx2.cpp, linear_kernel_plain.cpp).
//
// No torch headers here, for the same reason as quant_kernels.h: the SIMD builds compile this with their own
// target flags and must not instantiate inline functions that other translation units instantiate without.
//
// The arithmetic contract (batch invariance): within one kernel, out[t, n] is always computed the same way,
// whatever T is, whichever other rows are in the call and however n0..n1 is cut:
//   kWidth lanes (16 for avx512, 8 for avx2 and plain), lane l accumulating w[n, k] * x[t, k] for
//   k = l, l + kWidth, l + 2 kWidth, ... < K - K % kWidth in ascending k, one fused multiply-add each
//   (plain: a * b + c, two roundings); then the lanes summed as a tree (lane l + lane l + kWidth/2,
//   halving down to one); then the K % kWidth tail added one product at a time in ascending k.
// Weights are widened to float32 exactly (bf16: a 16-bit shift; fp16: vcvtph2ps / an exact software
// conversion), so where a weight is widened (in registers or into a scratch row) does not change the result.
#pragma once
#include <cstdint>

namespace layerskip {
namespace linear_kernels {

// Element type of the weight matrix.
enum WeightType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// out[t * ldo + n] = sum_k w[n, k] * x[t, k] for n in [n0, n1), t < T, with w row-major [N, K] of wtype (row
// n at element n * K) and x row-major [T, K] float32.
using RowsKernel = void (*)(int wtype, const void* w, int64_t K, int64_t n0, int64_t n1, const float* x,
                            int64_t T, float* out, int64_t ldo);

void rows_plain(int wtype, const void* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t T,
                float* out, int64_t ldo);
void rows_avx2(int wtype, const void* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t T,
               float* out, int64_t ldo);
// avx512bf16: float32 / float16 weights as rows_avx512; bfloat16 weights against the input rows rounded to
// bfloat16, in AVX512_BF16 dot products (the order is stated in linear_kernel_bf16dot.inc).
void rows_avx512bf16(int wtype, const void* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t T,
                     float* out, int64_t ldo);
void rows_avx512(int wtype, const void* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t T,
                 float* out, int64_t ldo);

// Whether kernel `fn` rounds the input rows to bfloat16 for bfloat16 weights (then linear uses it at every T).
inline bool rounds_bf16_inputs(RowsKernel fn) { return fn == &rows_avx512bf16; }

}  // namespace linear_kernels
}  // namespace layerskip
