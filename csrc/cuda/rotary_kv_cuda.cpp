// Torch glue of the CUDA rotary_embedding and kv_cache_write (kernels in rotary_kv.cu). Shapes and dtypes are
// checked as on the CPU; the contents of positions / rows are not (that would need a host synchronisation): on
// the GPU a position outside [0, max_pos) is clamped into it, and a token whose row is outside [0, B) or whose
// position is outside [0, S) is not written to the cache.
#include "cuda/glue.h"
#include "op_shapes.h"

namespace layerskip {
namespace cuda {
namespace {

void rotary_embedding_cuda(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  check_cuda(query, op, "query");
  check_same_device(key, query, op, "key");
  check_same_device(positions, query, op, "positions");
  check_same_device(cos_sin_cache, query, op, "cos_sin_cache");
  shapes::check_rotary(query, key, positions, cos_sin_cache, op);
  check_float(query, op, "query");
  const int64_t tokens = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(cos_sin_cache.size(0) > 0, op, ": cos_sin_cache must have at least one position");
  if (tokens == 0 || head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const auto pos = positions.contiguous();
  const auto cache = cos_sin_cache.contiguous();
  const cudaStream_t stream = current_stream();
  check_launch(rotary_embedding(dtype_of(query), dtype_of(cache), query.data_ptr(), tokens, query.size(1),
                                query.stride(0), query.stride(1), pos.data_ptr<int64_t>(), cache.data_ptr(),
                                cache.size(0), head_dim, nullptr, stream),
               op);
  check_launch(rotary_embedding(dtype_of(key), dtype_of(cache), key.data_ptr(), tokens, key.size(1), key.stride(0),
                                key.stride(1), pos.data_ptr<int64_t>(), cache.data_ptr(), cache.size(0), head_dim,
                                nullptr, stream),
               op);
}

void kv_cache_write_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& rows, const at::Tensor& positions) {
  const char* op = "kv_cache_write";
  check_cuda(k_cache, op, "k_cache");
  check_same_device(v_cache, k_cache, op, "v_cache");
  check_same_device(key, k_cache, op, "key");
  check_same_device(value, k_cache, op, "value");
  check_same_device(rows, k_cache, op, "rows");
  check_same_device(positions, k_cache, op, "positions");
  shapes::check_kv_cache_write(k_cache, v_cache, key, value, rows, positions, op);
  check_float(k_cache, op, "k_cache");
  check_float(v_cache, op, "v_cache");
  check_float(key, op, "key");
  check_float(value, op, "value");
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), capacity = k_cache.size(2),
                head_dim = k_cache.size(3);
  const int64_t tokens = key.size(0);
  if (tokens == 0 || heads == 0 || head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto r = rows.contiguous();
  const auto p = positions.contiguous();
  const cudaStream_t stream = current_stream();
  check_launch(kv_cache_write(dtype_of(k_cache), dtype_of(key), k_cache.data_ptr(), key.data_ptr(), key.stride(0),
                              key.stride(1), r.data_ptr<int64_t>(), p.data_ptr<int64_t>(), tokens, batch, heads,
                              capacity, head_dim, nullptr, stream),
               op);
  check_launch(kv_cache_write(dtype_of(v_cache), dtype_of(value), v_cache.data_ptr(), value.data_ptr(),
                              value.stride(0), value.stride(1), r.data_ptr<int64_t>(), p.data_ptr<int64_t>(), tokens,
                              batch, heads, capacity, head_dim, nullptr, stream),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) {
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("kv_cache_write", &kv_cache_write_cuda);
}

}  // namespace cuda
}  // namespace layerskip
