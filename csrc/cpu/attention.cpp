// CPU kernel of attention: causal grouped-query attention of T tokens (from any rows) against the KV cache.
// Token t attends to slots [0, positions[t]] of cache row rows[t]. Scores, softmax and the weighted sum of
// values in float32; query / caches float32 or bfloat16. One task per (token, query head), split across
// threads; a task's arithmetic depends only on its token (batch invariant).
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype_dispatch.h"
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

template <typename Q, typename C>
void attention_kernel(const Q* query, int64_t sq_t, int64_t sq_h, const C* k_cache, const C* v_cache, Q* out,
                      const int64_t* rows, const int64_t* positions, int64_t tokens, int64_t q_heads,
                      int64_t kv_heads, int64_t capacity, int64_t head_dim, float scale) {
  const int64_t group = q_heads / kv_heads;
  int64_t longest = 1;  // keys of the longest token
  for (int64_t t = 0; t < tokens; ++t) longest = std::max(longest, positions[t] + 1);
  const int64_t work_per_item = longest * head_dim * 2;  // flops-ish of the longest token
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_item, 1));
  cpu::parallel_for(0, tokens * q_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(head_dim), acc(head_dim), scores(longest);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / tokens, t = r % tokens;  // token-minor: consecutive tasks share a kv head
      const int64_t kvh = h / group;
      const Q* qr = query + t * sq_t + h * sq_h;
      for (int64_t i = 0; i < head_dim; ++i) q[i] = cpu::to_float(qr[i]) * scale;
      const int64_t base = (rows[t] * kv_heads + kvh) * capacity * head_dim;  // [S, D] of (row, kv head)
      attend_row(q.data(), k_cache + base, v_cache + base, positions[t] + 1, head_dim, scores.data(), acc.data());
      Q* o = out + (t * q_heads + h) * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) o[i] = cpu::from_float<Q>(acc[i]);
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
  cpu::dispatch_float_pair(query.scalar_type(), k_cache.scalar_type(), [&](auto* q_tag, const auto* c_tag) {
    using Q = cpu::elem_t<decltype(q_tag)>;
    using C = cpu::elem_t<decltype(c_tag)>;
    attention_kernel<Q, C>(query.data_ptr<Q>(), query.stride(0), query.stride(1), k_cache.data_ptr<C>(),
                           v_cache.data_ptr<C>(), out.data_ptr<Q>(), r.data_ptr<int64_t>(), p.data_ptr<int64_t>(),
                           s.tokens, s.q_heads, s.kv_heads, s.capacity, s.head_dim, static_cast<float>(scale));
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace layerskip
