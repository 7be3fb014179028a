// The kernels of layerskip::attention on the CPU (csrc/cpu/attention.cpp): the shared description of one call
// and the signature of a kernel, which computes one "run" (consecutive tokens of the call that read the same
// cache row) against one kv head, for every query head of that kv head's group.
//
// No torch headers here, for the same reason as linear_kernels.h: attention_kernel_avx512.cpp and
// attention_kernel_avx2.cpp compile this with their own target flags and must not instantiate inline functions
// that other translation units instantiate without them.
//
// The arithmetic contract (batch invariance): within one kernel, the output of (token t, query head h) is
// always computed the same way whatever T is, whichever other tokens share its run or its call and however
// threads split the runs: it depends only on q[t, h], positions[t] and the cache row's slots [0, positions[t]].
#pragma once
#include <cstdint>

namespace layerskip {
namespace attention_kernels {

// Element type of the query / output and of the caches.
enum ElemType : int { kF32 = 0, kBF16 = 1 };

// One call. query [T, Hq, D] with strides (q_stride_t, q_stride_h, 1); out [T, Hq, D] contiguous, of the query's
// type; caches [B, Hkv, S, D] contiguous. Token t attends to slots [0, positions[t]] of its row.
struct Problem {
  const void* query;
  int64_t q_stride_t, q_stride_h;
  int qtype;
  const void* k_cache;
  const void* v_cache;
  int ctype;
  void* out;
  const int64_t* positions;
  int64_t q_heads, kv_heads, capacity, head_dim;
  float scale;
};

// At most this many tokens in one run (bounds the scratch and keeps enough runs for the threads in a prefill).
constexpr int64_t kMaxRunTokens = 8;

// Tokens [t0, t1) (t1 - t0 <= kMaxRunTokens, all of cache row `row`) against kv head kvh: writes out[t, h] for
// those tokens and the query heads h of the group of kvh. scratch: run_scratch_floats(...) floats, 64-byte aligned.
using RunKernel = void (*)(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch);

// Scratch of one run of `tokens` tokens whose longest attends to `keys` slots (internal linkage: each
// translation unit compiles its own copy).
static inline int64_t run_scratch_floats(int64_t tokens, int64_t group, int64_t keys, int64_t head_dim) {
  const int64_t queries = tokens * group;
  const int64_t dp = (head_dim + 15) / 16 * 16, np = (keys + 15) / 16 * 16;
  // pre-scaled queries [queries, dp], scores [queries, np], 16 floats per query (its softmax sum), partial sums of
  // 8 queries x 16 keys x 16 lanes, and room to align the start to 64 bytes
  return queries * (dp + np + 16) + 8 * 16 * 16 + 16;
}

void run_avx512(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch);
void run_avx2(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch);

}  // namespace attention_kernels
}  // namespace layerskip
