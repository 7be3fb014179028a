// CPU kernel of attention: causal grouped-query attention of T tokens (from any rows) against the KV cache.
// Token t attends to slots [0, positions[t]] of cache row rows[t]. Scores, softmax and the weighted sum of
// values in float32; query / caches float32 or bfloat16.
//
// The call is cut into runs: consecutive tokens of the same cache row, at most kMaxRunTokens (8) of them (a
// batched decode step: one token per run; a self-speculative verify block or a prefill: runs of up to 8
// tokens of one row; shorter where that gives the threads too few tasks). One task per (run, kv head), split
// across threads; a task computes every query head of the kv head's group for every token of the run, so the
// SIMD kernels (attention_kernel_avx512.cpp, attention_kernel_avx2.cpp) load each key and value row once for
// the whole group and run instead of once per (token, head).
//
// Batch invariance: within one kernel a (token, head) output is computed by the same arithmetic whatever run
// it falls in, whatever else the call holds and however threads split the tasks (attention_kernels.h), so a
// token's output is the same bit for bit alone or in any call.
//
// The kernel is chosen at run time from cpuid: avx512 (AVX-512 F/BW/VL) > avx2 (AVX2 + FMA, the same structure
// on 8 lanes: attention_kernel_avx2.cpp) > plain (the kernel before them: one (token, head) at a time, a dot
// product per key, then an axpy per key, in loops the compiler vectorizes for the build's -march).
// LAYERSKIP_ATTENTION_KERNEL (read once) or layerskip::set_attention_kernel forces one the CPU supports, so
// tests run every path the machine has. Switching kernels changes the low bits of results: do it between
// generations, not during one.
#include "cpu/kernel_choice.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/attention_kernels.h"

#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "op_shapes.h"
#include "ops.h"

namespace layerskip {
namespace {

// One query row against n cache rows: out = softmax(scale * K[:n] q) V[:n].
// q [D] float (pre-scaled), k / v [n, D], scores [n] scratch, acc [D] scratch.
template <typename C>
inline void attend_row(const float* q, const C* k, const C* v, int64_t n, int64_t head_dim, float* scores,
                       float* acc) {
  for (int64_t j = 0; j < n; ++j) scores[j] = cpu::dot(q, k + j * head_dim, head_dim);
  const float m = cpu::max_value(scores, n);
  for (int64_t j = 0; j < n; ++j) scores[j] = cpu::exp_fast(scores[j] - m);
  const float inv_sum = 1.0f / cpu::sum(scores, n);
  for (int64_t i = 0; i < head_dim; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < n; ++j) cpu::axpy(scores[j] * inv_sum, v + j * head_dim, acc, head_dim);
}

// The plain kernel on a run: each (token, query head) by attend_row.
template <typename Q, typename C>
void run_plain_typed(const attention_kernels::Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh,
                     float* scratch) {
  const int64_t D = p.head_dim, G = p.q_heads / p.kv_heads;
  int64_t longest = 1;
  for (int64_t t = t0; t < t1; ++t) longest = std::max(longest, p.positions[t] + 1);
  float* q = scratch;          // [D]
  float* acc = q + D;          // [D]
  float* scores = acc + D;     // [longest]
  const int64_t base = (row * p.kv_heads + kvh) * p.capacity * D;  // [S, D] of (row, kv head)
  const C* k_cache = static_cast<const C*>(p.k_cache) + base;
  const C* v_cache = static_cast<const C*>(p.v_cache) + base;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
      const Q* qr = static_cast<const Q*>(p.query) + t * p.q_stride_t + h * p.q_stride_h;
      for (int64_t i = 0; i < D; ++i) q[i] = cpu::to_float(qr[i]) * p.scale;
      attend_row(q, k_cache, v_cache, p.positions[t] + 1, D, scores, acc);
      Q* o = static_cast<Q*>(p.out) + (t * p.q_heads + h) * D;
      for (int64_t i = 0; i < D; ++i) o[i] = cpu::from_float<Q>(acc[i]);
    }
  }
}

void run_plain(const attention_kernels::Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh,
               float* scratch) {
  using BF16 = c10::BFloat16;
  if (p.ctype == attention_kernels::kF32) {
    if (p.qtype == attention_kernels::kF32) return run_plain_typed<float, float>(p, row, t0, t1, kvh, scratch);
    return run_plain_typed<BF16, float>(p, row, t0, t1, kvh, scratch);
  }
  if (p.qtype == attention_kernels::kF32) return run_plain_typed<float, BF16>(p, row, t0, t1, kvh, scratch);
  run_plain_typed<BF16, BF16>(p, row, t0, t1, kvh, scratch);
}

// Best first. __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
std::vector<cpu::KernelChoice<attention_kernels::RunKernel>> all_kernels() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
                      __builtin_cpu_supports("fma");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return {{"avx512", &attention_kernels::run_avx512, avx512},
          {"avx2", &attention_kernels::run_avx2, avx2},
          {"plain", &run_plain, true}};
}

cpu::KernelSelector<attention_kernels::RunKernel>& selector() {
  static cpu::KernelSelector<attention_kernels::RunKernel> s("attention", "LAYERSKIP_ATTENTION_KERNEL",
                                                             all_kernels());
  return s;
}

// Runs: [starts[i], starts[i + 1]) are consecutive tokens of one row; a stretch of L such tokens is cut into
// ceil(L / cap) runs of nearly equal length.
std::vector<int64_t> run_starts(const int64_t* rows, int64_t tokens, int64_t cap) {
  std::vector<int64_t> starts;
  for (int64_t begin = 0, end; begin < tokens; begin = end) {
    for (end = begin + 1; end < tokens && rows[end] == rows[begin];) ++end;
    const int64_t pieces = (end - begin + cap - 1) / cap;
    for (int64_t i = 0; i < pieces; ++i) starts.push_back(begin + (end - begin) * i / pieces);
  }
  starts.push_back(tokens);
  return starts;
}

// The threads a parallel loop of this calling thread may use.
int64_t available_threads() {
  const int64_t threads = at::get_num_threads(), cap = cpu::tls_thread_cap;
  return cap > 0 ? std::min(cap, threads) : threads;
}

void attention_kernel(attention_kernels::RunKernel fn, const attention_kernels::Problem& p, const int64_t* rows,
                      int64_t tokens) {
  // Runs of up to kMaxRunTokens tokens; shorter ones while that leaves fewer than two tasks per thread (a
  // verify block of 5 tokens with 3 kv heads: 6 tasks, not 3, for 2 threads). Never changes a result.
  const int64_t threads = available_threads();
  int64_t cap = attention_kernels::kMaxRunTokens;
  std::vector<int64_t> starts = run_starts(rows, tokens, cap);
  while (cap > 1 && (static_cast<int64_t>(starts.size()) - 1) * p.kv_heads < 2 * threads) {
    cap = (cap + 1) / 2;
    starts = run_starts(rows, tokens, cap);
  }
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1, group = p.q_heads / p.kv_heads;
  int64_t longest = 1, scratch = 0, work = 0;  // keys of the longest token; floats of the largest scratch
  for (int64_t i = 0; i < runs; ++i) {
    int64_t keys = 1;
    for (int64_t t = starts[i]; t < starts[i + 1]; ++t) keys = std::max(keys, p.positions[t] + 1);
    longest = std::max(longest, keys);
    scratch = std::max(scratch, attention_kernels::run_scratch_floats(starts[i + 1] - starts[i], group, keys,
                                                                      p.head_dim));
    work += keys * (starts[i + 1] - starts[i]);
  }
  scratch = std::max(scratch, 2 * p.head_dim + longest + 16);  // the plain kernel's
  // Tasks (kv head, run), kv-head-major (consecutive tasks of a thread mostly share a kv head, and the runs of a
  // cut verify block land on both threads). A chunk of tasks gets about 2^17 multiply-adds (a few
  // microseconds) or more.
  const int64_t tasks = runs * p.kv_heads;
  const int64_t per_task = std::max<int64_t>(1, work * group * p.head_dim * 2 / runs);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / per_task);
  cpu::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buffer(new float[scratch + 16]);  // uninitialized: the kernels write before reading
    float* aligned = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.get()) + 63) & ~uintptr_t{63});
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kvh = task / runs, run = task % runs;
      fn(p, rows[starts[run]], starts[run], starts[run + 1], kvh, aligned);
    }
  });
}

}  // namespace

void attention_cpu(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& rows, const torch::Tensor& positions,
                   double scale) {
  const char* op = "attention";
  cpu::check_cpu(query, op, "query");
  cpu::check_cpu(k_cache, op, "k_cache");
  cpu::check_cpu(v_cache, op, "v_cache");
  cpu::check_cpu(rows, op, "rows");
  cpu::check_cpu(positions, op, "positions");
  const shapes::AttentionSizes s = shapes::check_attention(query, k_cache, v_cache, rows, positions, scale, op);
  cpu::check_float(query, true, op, "query");
  cpu::check_float(k_cache, true, op, "k_cache");
  cpu::check_out(out, query.sizes(), query.scalar_type(), op, "out");
  cpu::check_indices(rows, s.batch, op, "rows", "B = k_cache.size(0)");
  cpu::check_indices(positions, s.capacity, op, "positions", "S = k_cache.size(2)");
  if (out.numel() == 0) return;
  const auto r = rows.contiguous();
  const auto p = positions.contiguous();
  const auto type_of = [](const torch::Tensor& x) {
    return x.scalar_type() == at::kFloat ? attention_kernels::kF32 : attention_kernels::kBF16;
  };
  const attention_kernels::Problem problem{query.data_ptr(),  query.stride(0),   query.stride(1),
                                           type_of(query),    k_cache.data_ptr(), v_cache.data_ptr(),
                                           type_of(k_cache),  out.data_ptr(),     p.data_ptr<int64_t>(),
                                           s.q_heads,         s.kv_heads,         s.capacity,
                                           s.head_dim,        static_cast<float>(scale)};
  attention_kernel(selector().current()->fn, problem, r.data_ptr<int64_t>(), s.tokens);
}

std::vector<std::string> attention_kernels_cpu() { return selector().supported_names(); }

std::string attention_kernel_cpu() { return selector().current()->name; }

void set_attention_kernel_cpu(const std::string& name) { selector().set(name); }

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("attention", &attention_cpu); }

// No tensor arguments: these dispatch to their CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(layerskip, CompositeImplicitAutograd, m) {
  m.impl("attention_kernels", &attention_kernels_cpu);
  m.impl("attention_kernel", &attention_kernel_cpu);
  m.impl("set_attention_kernel", &set_attention_kernel_cpu);
}

}  // namespace layerskip
