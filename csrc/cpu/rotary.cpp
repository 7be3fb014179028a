// CPU kernel of rotary_embedding: rotate-half (HF Llama) rotary position embedding of query and
// key in place, at per-token positions. query / key may be strided views (e.g. slices of a fused QKV
// projection) as long as the head dimension is dense. float32 or bfloat16; math in float32.
#include "cpu/parallel.h"

#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "op_shapes.h"
#include "ops.h"

namespace layerskip {
namespace {

// One head vector x [D] in place: for i < D/2, (x[i], x[i + D/2]) rotated by the angle whose
// cos / sin are cs[i] / cs[D/2 + i].
template <typename T, typename C>
inline void rotate_head(T* x, const C* cs, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float c = cpu::to_float(cs[i]);
    const float s = cpu::to_float(cs[half + i]);
    const float x1 = cpu::to_float(x[i]);
    const float x2 = cpu::to_float(x[half + i]);
    x[i] = cpu::from_float<T>(x1 * c - x2 * s);
    x[half + i] = cpu::from_float<T>(x2 * c + x1 * s);
  }
}

// All heads of one tensor x [T, H, D] (strides st, sh; stride 1 over D).
template <typename T, typename C>
void rotate_all(T* x, int64_t tokens, int64_t heads, int64_t st, int64_t sh, const int64_t* pos, const C* cache,
                int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / head_dim);
  cpu::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads, h = r % heads;
      rotate_head(x + t * st + h * sh, cache + pos[t] * head_dim, half);
    }
  });
}

}  // namespace

void rotary_embedding_cpu(torch::Tensor& query, torch::Tensor& key, const torch::Tensor& positions,
                          const torch::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  cpu::check_cpu(query, op, "query");
  cpu::check_cpu(key, op, "key");
  cpu::check_cpu(positions, op, "positions");
  cpu::check_cpu(cos_sin_cache, op, "cos_sin_cache");
  shapes::check_rotary(query, key, positions, cos_sin_cache, op);
  cpu::check_float(query, true, op, "query");
  const int64_t tokens = query.size(0), head_dim = query.size(2);

  const auto pos = positions.contiguous();
  const auto cache = cos_sin_cache.contiguous();
  const int64_t max_pos = cache.size(0);
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, op, ": positions[", t, "] = ", p[t], " is outside [0, ", max_pos,
                ") (max_pos = cos_sin_cache.size(0))");
  }
  if (tokens == 0 || head_dim == 0) return;

  cpu::dispatch_float_pair(query.scalar_type(), cache.scalar_type(), [&](auto* t_tag, const auto* c_tag) {
    using T = cpu::elem_t<decltype(t_tag)>;
    using C = cpu::elem_t<decltype(c_tag)>;
    const C* cs = cache.data_ptr<C>();
    rotate_all(query.data_ptr<T>(), tokens, query.size(1), query.stride(0), query.stride(1), p, cs, head_dim);
    rotate_all(key.data_ptr<T>(), tokens, key.size(1), key.stride(0), key.stride(1), p, cs, head_dim);
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace layerskip
