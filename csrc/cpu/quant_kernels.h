// Packed GGUF blocks (Q8_0, Q4_0, Q4_1) against int8-quantized activations: the shared declarations of
// the kernels of layerskip::linear_quantized (csrc/cpu/quant_linear.cpp) and their per-ISA builds.
//
// No torch headers here: the SIMD builds (quant_kernel_avx2.cpp, quant_kernel_avx512.cpp,
// quant_kernel_avx512vnni.cpp) compile this with their own target flags, and must not instantiate any
// inline function that other translation units also instantiate without those flags.
//
// Block layouts (GGUF / ggml, 32 weights each, little endian):
//   Q8_0: fp16 d, int8 q[32]                      w[i] = d * q[i]                     34 bytes
//   Q4_0: fp16 d, uint8 qs[16]                    w[i] = d * (nibble(i) - 8)          18 bytes
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]            w[i] = d * nibble(i) + m            20 bytes
// where nibble(i) is the low nibble of qs[i] for i < 16 and the high nibble of qs[i - 16] otherwise.
// A weight matrix [N, K] is N rows of K / 32 blocks each, row after row (the file's bytes as they are).
//
// Activations: each block of 32 values of an input row is quantized to int8 as llama.cpp does,
// scale = max|x| / 127, q = round(x / scale) (so the int8 dot product of a block is exact in int32),
// and the float sum of the block's values is kept for Q4_1's min term (exact, not from the int8 values).
// Two-level mode (the default, "int8x2"): the rounding residual r = x - scale * q (|r| <= scale / 2) is
// quantized again, scale2 = scale / 256, q2 = round(r / scale2) clamped to [-127, 127], and each block costs a
// second int8 dot product against the same decoded weights: x is then held to ~1/65000 of the block's max
// (int16-like: x = scale2 * (256 q + q2)) instead of 1/254, which keeps a model's greedy tokens those of its
// dequantized weights. The interleaved kernels add the two dot products in int32 (256 dot(q) + dot(q2)) and
// scale the sum once.
#pragma once
#include <cstdint>

namespace layerskip {
namespace quant {

constexpr int64_t kBlock = 32;  // weights per block, every format

// The formats, numbered as GGUF's GGMLQuantizationType.
enum Format : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

// The same blocks interleaved by groups of kGroup rows (quant_interleave.h): format kInterleaved + a GGUF
// format. Same bytes per block; the kernels then compute kGroup rows per vector, one row per 32-bit lane.
constexpr int64_t kInterleaved = 1000;
constexpr int64_t kGroup = 16;

static inline bool is_interleaved(int64_t format) { return format > kInterleaved; }
static inline int64_t base_format(int64_t format) { return is_interleaved(format) ? format - kInterleaved : format; }

static inline int64_t block_bytes(int64_t format) {
  switch (base_format(format)) {
    case kQ8_0: return 34;
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    default: return 0;  // not a format we compute with
  }
}

// T input rows of K values, quantized per block of 32.
struct QuantizedActivations {
  const int8_t* q;     // [T, K]      round(x / scale)
  const float* scale;  // [T, K / 32] max|x| / 127 of each block (0 for an all-zero block)
  const float* sum;    // [T, K / 32] sum of the block's float values
  const float* qsum;   // [T, K / 32] sum of the block's rounded values (Q4_0's -8 offset, applied per block)
  int64_t T, K;
  const int8_t* q2 = nullptr;       // [T, K] residual codes (two-level mode), nullptr: one level
  const float* scale2 = nullptr;    // [T, K / 32] scale / 256
  const int32_t* codes = nullptr;   // [T, K / 32] sum of the block's codes q (the interleaved kernels' offsets)
  const int32_t* codes2 = nullptr;  // [T, K / 32] sum of the block's residual codes q2 (two-level mode)
};

// out[t * ldo + n] = sum_k W[n, k] * x[t, k] for n in [n0, n1), every t < T, with W's rows packed in
// `format` (row_bytes = K / 32 * block_bytes bytes each, row n at w + n * row_bytes; an interleaved format:
// groups of kGroup rows, n0 a multiple of kGroup, see quant_interleave.h).
using RowsKernel = void (*)(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                            const QuantizedActivations& x, float* out, int64_t ldo);

void rows_plain(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                const QuantizedActivations& x, float* out, int64_t ldo);
void rows_avx2(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
               const QuantizedActivations& x, float* out, int64_t ldo);
void rows_avx512(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                 const QuantizedActivations& x, float* out, int64_t ldo);
void rows_avx512vnni(int64_t format, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                     const QuantizedActivations& x, float* out, int64_t ldo);

// IEEE half -> float without F16C (the plain path and the dequantizer).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {        // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

}  // namespace quant
}  // namespace layerskip
