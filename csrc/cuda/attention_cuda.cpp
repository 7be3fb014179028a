// Torch glue of the CUDA attention (kernel in attention.cu): the CPU op's checks, device guard, current stream.
#include <cmath>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

at::Tensor attention_cuda(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             int64_t start_pos, double scale) {
  const char* op = "attention";
  check_cuda(query, op, "query");
  check_same_device(k_cache, query, op, "k_cache");
  check_same_device(v_cache, query, op, "v_cache");
  check_dim(query, 3, op, "query [T, Hq, D]");
  check_dim(k_cache, 3, op, "k_cache [Hkv, S, D]");
  check_dim(v_cache, 3, op, "v_cache [Hkv, S, D]");
  check_float(query, op, "query");
  check_float(k_cache, op, "k_cache");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have the dtype of k_cache (",
              k_cache.scalar_type(), "), got ", v_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const int64_t tokens = query.size(0), q_heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = k_cache.size(0), capacity = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == head_dim, op, ": k_cache head_dim ", k_cache.size(2), " differs from query's ",
              head_dim);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, op, ": query heads (", q_heads,
              ") must be a multiple of cache heads (", kv_heads, ")");
  TORCH_CHECK(head_dim <= 256, op, ": head_dim must be <= 256 on CUDA, got ", head_dim);
  TORCH_CHECK(start_pos >= 0, op, ": start_pos must be >= 0, got ", start_pos);
  TORCH_CHECK(start_pos + tokens <= capacity, op, ": start_pos + T = ", start_pos, " + ", tokens,
              " exceeds the cache capacity S = ", capacity);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_last_dim_dense(query, op, "query");
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  const c10::cuda::CUDAGuard guard(query.device());
  auto out = at::empty({tokens, q_heads, head_dim}, query.options());
  if (out.numel() == 0) return out;
  check_launch(attention(dtype_of(query), dtype_of(k_cache), query.data_ptr(), query.stride(0), query.stride(1),
                         k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), tokens, q_heads, 1, kv_heads, capacity,
                         head_dim, nullptr, start_pos, nullptr, static_cast<float>(scale), current_stream()),
               op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace cuda
}  // namespace layerskip
