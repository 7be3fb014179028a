// CPU kernel of kv_cache_write: scatter the keys / values of T tokens into the per-layer caches at
// their slots (positions). Caches and inputs may each be float32 or bfloat16 (converted on copy);
// key / value may be strided views with a dense head dimension. Duplicate slots: the last token wins.
#include <ATen/Parallel.h>

#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "ops.h"

namespace layerskip {
namespace {

// cache [Hkv, S, D] contiguous; src [T, Hkv, D] with strides (st, sh, 1).
template <typename C, typename T>
void scatter_rows(C* cache, const T* src, int64_t st, int64_t sh, const int64_t* slots, int64_t tokens, int64_t heads,
                  int64_t capacity, int64_t head_dim) {
  // Heads split across threads; the tokens of a head are written in order, so the last of
  // duplicate slots wins deterministically.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(tokens * head_dim, 1));
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t t = 0; t < tokens; ++t) {
        const T* from = src + t * st + h * sh;
        C* to = cache + (h * capacity + slots[t]) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) to[i] = cpu::from_float<C>(cpu::to_float(from[i]));
      }
    }
  });
}

template <typename C>
void scatter(torch::Tensor& cache, const torch::Tensor& src, const int64_t* slots) {
  const int64_t tokens = src.size(0), heads = src.size(1), head_dim = src.size(2), capacity = cache.size(1);
  if (src.scalar_type() == at::kFloat) {
    scatter_rows(cache.data_ptr<C>(), src.data_ptr<float>(), src.stride(0), src.stride(1), slots, tokens, heads,
                 capacity, head_dim);
  } else {
    scatter_rows(cache.data_ptr<C>(), src.data_ptr<c10::BFloat16>(), src.stride(0), src.stride(1), slots, tokens,
                 heads, capacity, head_dim);
  }
}

}  // namespace

void kv_cache_write_cpu(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& key,
                        const torch::Tensor& value, const torch::Tensor& slots) {
  const char* op = "kv_cache_write";
  cpu::check_cpu(k_cache, op, "k_cache");
  cpu::check_cpu(v_cache, op, "v_cache");
  cpu::check_cpu(key, op, "key");
  cpu::check_cpu(value, op, "value");
  cpu::check_cpu(slots, op, "slots");
  cpu::check_dim(k_cache, 3, op, "k_cache [Hkv, S, D]");
  cpu::check_dim(v_cache, 3, op, "v_cache [Hkv, S, D]");
  cpu::check_dim(key, 3, op, "key [T, Hkv, D]");
  cpu::check_dim(value, 3, op, "value [T, Hkv, D]");
  cpu::check_dim(slots, 1, op, "slots [T]");
  cpu::check_float(k_cache, true, op, "k_cache");
  cpu::check_float(v_cache, true, op, "v_cache");
  cpu::check_float(key, true, op, "key");
  cpu::check_float(value, true, op, "value");
  cpu::check_long(slots, op, "slots");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have the shape of key ", key.sizes(), ", got ",
              value.sizes());
  const int64_t heads = k_cache.size(0), capacity = k_cache.size(1), head_dim = k_cache.size(2);
  const int64_t tokens = key.size(0);
  TORCH_CHECK(key.size(1) == heads && key.size(2) == head_dim, op, ": key must have shape [T, ", heads, ", ", head_dim,
              "] to match k_cache ", k_cache.sizes(), ", got ", key.sizes());
  TORCH_CHECK(slots.size(0) == tokens, op, ": slots must have shape [", tokens, "], got ", slots.sizes());
  cpu::check_contiguous(k_cache, op, "k_cache");
  cpu::check_contiguous(v_cache, op, "v_cache");
  cpu::check_last_dim_dense(key, op, "key");
  cpu::check_last_dim_dense(value, op, "value");

  const auto s = slots.contiguous();
  const int64_t* sl = s.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sl[t] >= 0 && sl[t] < capacity, op, ": slots[", t, "] = ", sl[t], " is outside [0, ", capacity,
                ") (S = k_cache.size(1))");
  }
  if (tokens == 0 || heads == 0 || head_dim == 0) return;
  if (k_cache.scalar_type() == at::kFloat) {
    scatter<float>(k_cache, key, sl);
  } else {
    scatter<c10::BFloat16>(k_cache, key, sl);
  }
  if (v_cache.scalar_type() == at::kFloat) {
    scatter<float>(v_cache, value, sl);
  } else {
    scatter<c10::BFloat16>(v_cache, value, sl);
  }
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }

}  // namespace layerskip
