// Torch glue of the CUDA attention (kernel in attention.cu): the CPU op's checks, device guard, current stream.
// rows / positions are read on the device (not checked: that would need a host synchronisation); a row outside
// [0, B) is clamped into it and a position outside [0, S) sees min(position + 1, S) slots, at least one.
#include "cuda/glue.h"
#include "op_shapes.h"

namespace layerskip {
namespace cuda {
namespace {

void attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& rows, const at::Tensor& positions, double scale) {
  const char* op = "attention";
  check_cuda(query, op, "query");
  check_same_device(k_cache, query, op, "k_cache");
  check_same_device(v_cache, query, op, "v_cache");
  check_same_device(rows, query, op, "rows");
  check_same_device(positions, query, op, "positions");
  const shapes::AttentionSizes s = shapes::check_attention(query, k_cache, v_cache, rows, positions, scale, op);
  check_float(query, op, "query");
  check_float(k_cache, op, "k_cache");
  TORCH_CHECK(s.head_dim <= 256, op, ": head_dim must be <= 256 on CUDA, got ", s.head_dim);
  check_out(out, query, query.sizes(), query.scalar_type(), op, "out");
  if (out.numel() == 0) return;
  TORCH_CHECK(s.batch > 0 && s.capacity > 0, op, ": the cache must hold at least one row and one position, got ",
              k_cache.sizes());
  const c10::cuda::CUDAGuard guard(query.device());
  const auto r = rows.contiguous();
  const auto p = positions.contiguous();
  check_launch(attention(dtype_of(query), dtype_of(k_cache), query.data_ptr(), query.stride(0), query.stride(1),
                         k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), s.tokens, s.q_heads, s.batch,
                         s.kv_heads, s.capacity, s.head_dim, r.data_ptr<int64_t>(), 0, p.data_ptr<int64_t>(),
                         static_cast<float>(scale), current_stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace cuda
}  // namespace layerskip
