// CPU kernel of kv_cache_write: scatter the keys / values of T tokens into the per-layer caches
// [B, Hkv, S, D] at (rows[t], positions[t]). Caches and inputs may each be float32 or bfloat16 (converted on
// copy); key / value may be strided views with a dense head dimension. Duplicate (row, position) pairs: the
// last token wins.
#include "cpu/parallel.h"

#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "op_shapes.h"
#include "ops.h"

namespace layerskip {
namespace {

// cache [B, Hkv, S, D] contiguous; src [T, Hkv, D] with strides (st, sh, 1).
template <typename C, typename T>
void scatter_rows(C* cache, const T* src, int64_t st, int64_t sh, const int64_t* rows, const int64_t* positions,
                  int64_t tokens, int64_t heads, int64_t capacity, int64_t head_dim) {
  // Heads split across threads; the tokens of a head are written in order, so the last of duplicate
  // (row, position) pairs wins deterministically.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(tokens * head_dim, 1));
  cpu::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t t = 0; t < tokens; ++t) {
        const T* from = src + t * st + h * sh;
        C* to = cache + ((rows[t] * heads + h) * capacity + positions[t]) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) to[i] = cpu::from_float<C>(cpu::to_float(from[i]));
      }
    }
  });
}

void scatter(torch::Tensor& cache, const torch::Tensor& src, const int64_t* rows, const int64_t* positions) {
  const int64_t tokens = src.size(0), heads = src.size(1), head_dim = src.size(2), capacity = cache.size(2);
  cpu::dispatch_float_pair(cache.scalar_type(), src.scalar_type(), [&](auto* c_tag, const auto* s_tag) {
    using C = cpu::elem_t<decltype(c_tag)>;
    using T = cpu::elem_t<decltype(s_tag)>;
    scatter_rows(cache.data_ptr<C>(), src.data_ptr<T>(), src.stride(0), src.stride(1), rows, positions, tokens,
                 heads, capacity, head_dim);
  });
}

}  // namespace

void kv_cache_write_cpu(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& key,
                        const torch::Tensor& value, const torch::Tensor& rows, const torch::Tensor& positions) {
  const char* op = "kv_cache_write";
  cpu::check_cpu(k_cache, op, "k_cache");
  cpu::check_cpu(v_cache, op, "v_cache");
  cpu::check_cpu(key, op, "key");
  cpu::check_cpu(value, op, "value");
  cpu::check_cpu(rows, op, "rows");
  cpu::check_cpu(positions, op, "positions");
  shapes::check_kv_cache_write(k_cache, v_cache, key, value, rows, positions, op);
  cpu::check_float(k_cache, true, op, "k_cache");
  cpu::check_float(v_cache, true, op, "v_cache");
  cpu::check_float(key, true, op, "key");
  cpu::check_float(value, true, op, "value");
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), capacity = k_cache.size(2);
  const int64_t head_dim = k_cache.size(3), tokens = key.size(0);
  cpu::check_indices(rows, batch, op, "rows", "B = k_cache.size(0)");
  cpu::check_indices(positions, capacity, op, "positions", "S = k_cache.size(2)");
  if (tokens == 0 || heads == 0 || head_dim == 0) return;
  const auto r = rows.contiguous();
  const auto p = positions.contiguous();
  scatter(k_cache, key, r.data_ptr<int64_t>(), p.data_ptr<int64_t>());
  scatter(v_cache, value, r.data_ptr<int64_t>(), p.data_ptr<int64_t>());
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }

}  // namespace layerskip
