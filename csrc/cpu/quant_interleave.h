// Packed GGUF blocks interleaved by groups of kGroup = 16 rows: the layout the decode kernels read
// (quant_kernel_simd.inc, rows16_*), so that one 512-bit instruction works on 16 weight rows at once, one row
// per 32-bit lane, and a row's dot product never needs a horizontal sum.
//
// The bytes of each block are those of the file (scales as fp16, codes as they are; Q8_0's codes with their
// sign bit flipped, w + 128 as unsigned bytes), only reordered. A matrix [N, K] in format F (Q8_0 / Q4_0 /
// Q4_1) becomes ceil(N / 16) groups; group g holds rows 16g..16g+15 (rows past N are zero blocks), its K / 32
// group-blocks one after the other, group-block b (16 * block_bytes(F) bytes) being:
//   d[16]        fp16, the scale of block b of each row                               32 bytes
//   m[16]        fp16, the min (Q4_1 only)                                            32 bytes
//   codes[C][16][4]  chunk c of 4 code bytes of each row: Q4 C = 4 (bytes 4c..4c+3 of the row's 16 nibble
//                bytes: weights 4c..4c+3 in the low nibbles, 16+4c..16+4c+3 in the high ones), Q8_0 C = 8
//                (weights 4c..4c+3, each + 128)                                       256 / 512 bytes
// so a group-block takes 16 x 18 (Q4_0), 16 x 20 (Q4_1) or 16 x 34 (Q8_0) bytes: no byte is added but the
// padding rows of the last group.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/quant_kernels.h"

namespace layerskip {
namespace quant {

// Rows of the interleaved form of an [N, K] matrix: N rounded up to a whole group.
static inline int64_t interleaved_rows(int64_t N) { return (N + kGroup - 1) / kGroup * kGroup; }

// Bytes of the interleaved form of an [N, K] matrix in a GGUF format.
static inline int64_t interleaved_bytes(int64_t format, int64_t N, int64_t K) {
  return interleaved_rows(N) * (K / kBlock) * block_bytes(format);
}

// Offsets inside a group-block of format F: scales, mins (Q4_1), codes.
static inline int64_t group_min_offset() { return 2 * kGroup; }
static inline int64_t group_codes_offset(int64_t format) {
  return base_format(format) == kQ4_1 ? 4 * kGroup : 2 * kGroup;
}
// Bytes of one block's codes: 16 for Q4 (two per byte), 32 for Q8_0.
static inline int64_t code_bytes(int64_t format) { return base_format(format) == kQ8_0 ? 32 : 16; }

// Row n (its K / 32 blocks) between the GGUF layout (row_gguf, K / 32 * block_bytes bytes) and the interleaved
// matrix il: to_gguf true reads the row out of il, false writes it into il.
static inline void move_row(int64_t format, int64_t K, int64_t n, uint8_t* il, uint8_t* row_gguf, bool to_gguf) {
  const int64_t F = base_format(format), bb = block_bytes(F), nb = K / kBlock;
  const int64_t g = n / kGroup, r = n % kGroup, cb = code_bytes(F), chunks = cb / 4;
  const int64_t head = F == kQ4_1 ? 4 : 2;  // scale (and min) bytes at the start of a GGUF block
  const uint8_t flip = F == kQ8_0 ? 0x80 : 0x00;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* gb = il + (g * nb + b) * kGroup * bb;  // the group-block
    uint8_t* blk = row_gguf + b * bb;
    uint8_t* codes = gb + group_codes_offset(F);
    if (to_gguf) {
      std::memcpy(blk, gb + 2 * r, 2);
      if (F == kQ4_1) std::memcpy(blk + 2, gb + group_min_offset() + 2 * r, 2);
      for (int64_t c = 0; c < chunks; ++c)
        for (int j = 0; j < 4; ++j) blk[head + 4 * c + j] = codes[(c * kGroup + r) * 4 + j] ^ flip;
    } else {
      std::memcpy(gb + 2 * r, blk, 2);
      if (F == kQ4_1) std::memcpy(gb + group_min_offset() + 2 * r, blk + 2, 2);
      for (int64_t c = 0; c < chunks; ++c)
        for (int j = 0; j < 4; ++j) codes[(c * kGroup + r) * 4 + j] = blk[head + 4 * c + j] ^ flip;
    }
  }
}

// The GGUF rows [N, K] (N * K / 32 * block_bytes bytes) -> interleaved (interleaved_bytes(format, N, K) bytes;
// padding rows: zero bytes, so zero scales: their outputs are never stored).
static inline void interleave(int64_t format, int64_t N, int64_t K, const uint8_t* gguf, uint8_t* il) {
  const int64_t F = base_format(format), row_bytes = K / kBlock * block_bytes(F);
  std::memset(il, 0, static_cast<size_t>(interleaved_bytes(F, N, K)));
  for (int64_t n = 0; n < N; ++n) move_row(F, K, n, il, const_cast<uint8_t*>(gguf + n * row_bytes), false);
}

}  // namespace quant
}  // namespace layerskip
