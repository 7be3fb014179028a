// Torch glue of the CUDA attention (kernel in attention.cu): the CPU op's checks, device guard, current stream.
// rows / positions are read on the device (not checked: that would need a host synchronisation); a row outside
// [0, B) is clamped into it and a position outside [0, S) sees min(position + 1, S) slots, at least one.
#include <cmath>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

void attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& rows, const at::Tensor& positions, double scale) {
  const char* op = "attention";
  check_cuda(query, op, "query");
  check_same_device(k_cache, query, op, "k_cache");
  check_same_device(v_cache, query, op, "v_cache");
  check_dim(query, 3, op, "query [T, Hq, D]");
  check_dim(k_cache, 4, op, "k_cache [B, Hkv, S, D]");
  check_dim(v_cache, 4, op, "v_cache [B, Hkv, S, D]");
  check_float(query, op, "query");
  check_float(k_cache, op, "k_cache");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have the dtype of k_cache (",
              k_cache.scalar_type(), "), got ", v_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const int64_t tokens = query.size(0), q_heads = query.size(1), head_dim = query.size(2);
  const int64_t batch = k_cache.size(0), kv_heads = k_cache.size(1), capacity = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, op, ": k_cache head_dim ", k_cache.size(3), " differs from query's ",
              head_dim);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, op, ": query heads (", q_heads,
              ") must be a multiple of cache heads (", kv_heads, ")");
  TORCH_CHECK(head_dim <= 256, op, ": head_dim must be <= 256 on CUDA, got ", head_dim);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_vector(rows, query, tokens, at::kLong, op, "rows");
  check_vector(positions, query, tokens, at::kLong, op, "positions");
  check_last_dim_dense(query, op, "query");
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  check_out(out, query, query.sizes(), query.scalar_type(), op, "out");
  if (out.numel() == 0) return;
  TORCH_CHECK(batch > 0 && capacity > 0, op, ": the cache must hold at least one row and one position, got ",
              k_cache.sizes());
  const c10::cuda::CUDAGuard guard(query.device());
  const auto r = rows.contiguous();
  const auto p = positions.contiguous();
  check_launch(attention(dtype_of(query), dtype_of(k_cache), query.data_ptr(), query.stride(0), query.stride(1),
                         k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), tokens, q_heads, batch, kv_heads,
                         capacity, head_dim, r.data_ptr<int64_t>(), 0, p.data_ptr<int64_t>(),
                         static_cast<float>(scale), current_stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace cuda
}  // namespace layerskip
