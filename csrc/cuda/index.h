// Index arithmetic of the CUDA kernels as __host__ __device__ functions, so that it is unit-tested on the
// host (tests/cpp/test_cuda_index.cpp) on machines without a GPU. No CUDA or torch header is needed to
// include this file.
#pragma once
#include <cstdint>
#include <cstring>

#include "random.h"  // LAYERSKIP_HOST_DEVICE, uniform_from_counter

namespace layerskip {
namespace cuda {

LAYERSKIP_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// [begin, end) of part `i` of `parts` nearly equal contiguous parts of [0, n).
struct Range {
  int64_t begin, end;
};
LAYERSKIP_HOST_DEVICE inline Range split_range(int64_t i, int64_t parts, int64_t n) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = i * base + (i < extra ? i : extra);
  return Range{begin, begin + base + (i < extra ? 1 : 0)};
}

// The kv head read by query head h under grouped-query attention (Hq a multiple of Hkv).
LAYERSKIP_HOST_DEVICE inline int64_t kv_head_of(int64_t h, int64_t q_heads, int64_t kv_heads) {
  return h / (q_heads / kv_heads);
}

// Number of cache slots query t sees: positions[t] + 1 when a position is given (pos >= 0), else
// start_pos + t + 1; clamped to [1, capacity].
LAYERSKIP_HOST_DEVICE inline int64_t visible_keys(int64_t start_pos, int64_t t, int64_t pos, int64_t capacity) {
  int64_t n = (pos >= 0 ? pos : start_pos + t) + 1;
  if (n < 1) n = 1;
  if (n > capacity) n = capacity;
  return n;
}

// i clamped into [0, n); *bad is set when it had to be.
LAYERSKIP_HOST_DEVICE inline int64_t clamp_index(int64_t i, int64_t n, bool* bad) {
  *bad = i < 0 || i >= n;
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// Element offset of (head, slot) in a contiguous cache [H, S, D].
LAYERSKIP_HOST_DEVICE inline int64_t cache_offset(int64_t head, int64_t slot, int64_t capacity, int64_t head_dim) {
  return (head * capacity + slot) * head_dim;
}

// The register tile of the skinny linear kernel: the smallest of 1, 8, 64 rows that holds `tokens`, or 0
// when tokens is outside [1, 64].
LAYERSKIP_HOST_DEVICE inline int linear_row_tile(int64_t tokens) {
  return tokens < 1 ? 0 : tokens <= 1 ? 1 : tokens <= 8 ? 8 : tokens <= 64 ? 64 : 0;
}

// ---- sampling
// Sort key of token i with logit z (as csrc/cpu/sampling.cpp): keys ascending = logits descending, ties by
// lower index first; -0 folded into +0.
LAYERSKIP_HOST_DEVICE inline uint64_t rank_key(float z, int64_t i) {
  const float zc = z + 0.0f;
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(zc);
#else
  std::memcpy(&bits, &zc, sizeof(bits));
#endif
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(static_cast<uint32_t>(~bits)) << 32) | static_cast<uint32_t>(i);
}

// Radix selection over 64-bit keys, 8 bits per pass, most significant digit first.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 64 / kRadixBits;

LAYERSKIP_HOST_DEVICE inline int radix_digit(uint64_t key, int pass) {
  return static_cast<int>((key >> (64 - kRadixBits * (pass + 1))) & (kRadixBins - 1));
}
// True when key agrees with prefix on the digits of passes before `pass`.
LAYERSKIP_HOST_DEVICE inline bool radix_matches(uint64_t key, uint64_t prefix, int pass) {
  if (pass == 0) return true;
  const int shift = 64 - kRadixBits * pass;
  return (key >> shift) == (prefix >> shift);
}
LAYERSKIP_HOST_DEVICE inline uint64_t radix_set_digit(uint64_t prefix, int pass, int digit) {
  const int shift = 64 - kRadixBits * (pass + 1);
  return prefix | (static_cast<uint64_t>(digit) << shift);
}

// One step of a weighted selection: given the weight of each bin among the keys that match the prefix,
// the weight `below` of all smaller keys, and a target, the first bin b with below + weight[0..b] >= target.
// `below` is advanced past the bins before b. Returns the last non-empty bin when rounding leaves the
// target out of reach.
template <typename W>
LAYERSKIP_HOST_DEVICE inline int radix_pick_bin(const W* weight, W* below, W target) {
  W cum = *below;
  int last = 0;
  for (int b = 0; b < kRadixBins; ++b) {
    if (weight[b] > W(0)) last = b;
    if (cum + weight[b] >= target && weight[b] > W(0)) {
      *below = cum;
      return b;
    }
    cum += weight[b];
  }
  // out of reach: take the last non-empty bin
  W before = *below;
  for (int b = 0; b < last; ++b) before += weight[b];
  *below = before;
  return last;
}

// ---- speculative decoding: counters of the draws of a round at `offset` with d drafts (as the CPU op)
LAYERSKIP_HOST_DEVICE inline uint64_t accept_counter(int64_t offset, int64_t i) { return offset + 2 * i; }
LAYERSKIP_HOST_DEVICE inline uint64_t resample_counter(int64_t offset, int64_t i) { return offset + 2 * i + 1; }
LAYERSKIP_HOST_DEVICE inline uint64_t bonus_counter(int64_t offset, int64_t d) { return offset + 2 * d; }
// Draft token x with draft prob qx and target prob px is accepted with probability min(1, px / qx).
LAYERSKIP_HOST_DEVICE inline bool accept_draft(double u, float qx, float px) { return u * qx < px; }
// A probability entry as the CUDA kernels read it: negative or non-finite entries count as 0.
LAYERSKIP_HOST_DEVICE inline float valid_prob(float p) { return (p >= 0.0f && p <= 3.4028234663852886e38f) ? p : 0.0f; }

}  // namespace cuda
}  // namespace layerskip
