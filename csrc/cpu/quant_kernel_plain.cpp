// The plain C++ kernel of layerskip::linear_quantized: the reference every SIMD path is tested against,
// and the path of CPUs without AVX2. Same arithmetic as the SIMD paths: per block an exact int32 dot
// product of the weight codes and the int8 activations, scaled by d * scale(x) (two-level mode: plus the
// residual codes' dot product times d * scale2(x)); Q4_1 adds m * sum(x).
#include <cmath>
#include <vector>

#include "cpu/quant_interleave.h"
#include "cpu/quant_kernels.h"

namespace layerskip {
namespace quant {

namespace {

// The 32 signed codes of a block (Q4_1: its unsigned nibbles), its scale d and its min m (Q4_1 only).
void decode_block(int64_t format, const uint8_t* blk, int32_t* codes, float* d, float* m) {
  *d = half_to_float(load_u16(blk));
  *m = 0.0f;
  if (format == kQ8_0) {
    for (int i = 0; i < kBlock; ++i) codes[i] = static_cast<int8_t>(blk[2 + i]);
    return;
  }
  const uint8_t* qs = blk + (format == kQ4_1 ? 4 : 2);
  const int32_t offset = format == kQ4_0 ? 8 : 0;
  if (format == kQ4_1) *m = half_to_float(load_u16(blk + 2));
  for (int i = 0; i < kBlock / 2; ++i) {
    codes[i] = (qs[i] & 0x0f) - offset;
    codes[i + kBlock / 2] = (qs[i] >> 4) - offset;
  }
}

// The exact int32 dot product of a block's 32 codes with 32 activation codes.
int32_t block_dot(const int32_t* codes, const int8_t* xq) {
  int32_t dot = 0;
  for (int i = 0; i < kBlock; ++i) dot += codes[i] * xq[i];
  return dot;
}

// Interleaved formats (quant_interleave.h): each row read back in the GGUF layout, then the order of operations
// of the interleaved SIMD kernels (quant_kernel_simd.inc, group_pass), so that they agree to the last bit: per
// block, the exact int32 dot products, then acc = fma(dot, d * scale(x), acc), the same for the residual codes,
// then Q4_1's acc = fma(m, sum(x), acc).
void rows_interleaved(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                      const QuantizedActivations& x, float* out, int64_t ldo) {
  const int64_t F = base_format(format), nb = x.K / kBlock, bb = block_bytes(F);
  std::vector<uint8_t> row(static_cast<size_t>(row_bytes));
  int32_t codes[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    move_row(format, x.K, n, const_cast<uint8_t*>(w), row.data(), true);
    for (int64_t t = 0; t < x.T; ++t) {
      const int8_t* xq = x.q + t * x.K;
      const int8_t* xq2 = x.q2 != nullptr ? x.q2 + t * x.K : nullptr;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        decode_block(F, row.data() + b * bb, codes, &d, &m);
        if (xq2 != nullptr) {  // the two levels' dot products added in int32 (codes 256 q + q2, scale2)
          const int32_t dot = 256 * block_dot(codes, xq + b * kBlock) + block_dot(codes, xq2 + b * kBlock);
          acc = std::fma(static_cast<float>(dot), d * x.scale2[t * nb + b], acc);
        } else {
          acc = std::fma(static_cast<float>(block_dot(codes, xq + b * kBlock)), d * x.scale[t * nb + b], acc);
        }
        if (F == kQ4_1) acc = std::fma(m, x.sum[t * nb + b], acc);
      }
      out[t * ldo + n] = acc;
    }
  }
}

}  // namespace

void rows_plain(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                const QuantizedActivations& x, float* out, int64_t ldo) {
  if (is_interleaved(format)) {
    rows_interleaved(format, w, row_bytes, n0, n1, x, out, ldo);
    return;
  }
  const int64_t nb = x.K / kBlock, bb = block_bytes(format);
  int32_t codes[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t t = 0; t < x.T; ++t) {
      const int8_t* xq = x.q + t * x.K;
      const int8_t* xq2 = x.q2 != nullptr ? x.q2 + t * x.K : nullptr;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        decode_block(format, row + b * bb, codes, &d, &m);
        float xw = x.scale[t * nb + b] * static_cast<float>(block_dot(codes, xq + b * kBlock));
        if (xq2 != nullptr) xw += x.scale2[t * nb + b] * static_cast<float>(block_dot(codes, xq2 + b * kBlock));
        acc += d * xw + m * x.sum[t * nb + b];
      }
      out[t * ldo + n] = acc;
    }
  }
}

}  // namespace quant
}  // namespace layerskip
