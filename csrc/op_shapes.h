// Shape and dtype rules of the attention-side ops' arguments, written once for the CPU kernels (csrc/cpu) and
// the CUDA glue (csrc/cuda). What differs per backend stays there: the device checks, the element types each
// backend computes in (check_float), and on the CPU the contents of index tensors (on the GPU reading them would
// need a host synchronisation). Every failure is a RuntimeError whose message names the op and the argument.
// Light ATen headers only, so that the CUDA glue files keep compiling in seconds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace layerskip {
namespace shapes {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The last dimension is dense (stride 1); the others may be strided (views of a fused projection).
inline void check_last_dim_dense(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

// A per-token parameter: [n] of dtype (its device is the backend's to check).
inline void check_vector_shape(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                               const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

struct AttentionSizes {
  int64_t tokens, q_heads, head_dim;  // query [T, Hq, D]
  int64_t batch, kv_heads, capacity;  // caches [B, Hkv, S, D]
};

// attention(out, query [T, Hq, D], k_cache / v_cache [B, Hkv, S, D], rows [T], positions [T], scale): every rule
// but the element types and the devices.
inline AttentionSizes check_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& rows, const at::Tensor& positions, double scale,
                                      const char* op) {
  check_dim(query, 3, op, "query [T, Hq, D]");
  check_dim(k_cache, 4, op, "k_cache [B, Hkv, S, D]");
  check_dim(v_cache, 4, op, "v_cache [B, Hkv, S, D]");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have the dtype of k_cache (",
              k_cache.scalar_type(), "), got ", v_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const AttentionSizes s{query.size(0), query.size(1), query.size(2), k_cache.size(0), k_cache.size(1),
                         k_cache.size(2)};
  TORCH_CHECK(k_cache.size(3) == s.head_dim, op, ": k_cache head_dim ", k_cache.size(3), " differs from query's ",
              s.head_dim);
  TORCH_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, op, ": query heads (", s.q_heads,
              ") must be a multiple of cache heads (", s.kv_heads, ")");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_vector_shape(rows, s.tokens, at::kLong, op, "rows");
  check_vector_shape(positions, s.tokens, at::kLong, op, "positions");
  check_last_dim_dense(query, op, "query");
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  return s;
}

// rotary_embedding(query [T, Hq, D], key [T, Hkv, D], positions [T], cos_sin_cache [max_pos, D]), in place: every
// rule but query's element type and the devices.
inline void check_rotary(const at::Tensor& query, const at::Tensor& key, const at::Tensor& positions,
                         const at::Tensor& cos_sin_cache, const char* op) {
  check_dim(query, 3, op, "query [T, Hq, D]");
  check_dim(key, 3, op, "key [T, Hkv, D]");
  check_dim(positions, 1, op, "positions [T]");
  check_dim(cos_sin_cache, 2, op, "cos_sin_cache [max_pos, D]");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), op, ": key must have the dtype of query (",
              query.scalar_type(), "), got ", key.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == query.scalar_type(), op,
              ": cos_sin_cache must be float32 or the dtype of query, got ", cos_sin_cache.scalar_type());
  const int64_t tokens = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(key.size(0) == tokens && key.size(2) == head_dim, op, ": key must have shape [", tokens, ", Hkv, ",
              head_dim, "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK(positions.size(0) == tokens, op, ": positions must have shape [", tokens, "], got ", positions.sizes());
  TORCH_CHECK(head_dim % 2 == 0, op, ": head_dim must be even, got ", head_dim);
  TORCH_CHECK(cos_sin_cache.size(1) == head_dim, op, ": cos_sin_cache must have shape [max_pos, ", head_dim,
              "], got ", cos_sin_cache.sizes());
  check_last_dim_dense(query, op, "query");
  check_last_dim_dense(key, op, "key");
}

// kv_cache_write(k_cache / v_cache [B, Hkv, S, D], key / value [T, Hkv, D], rows [T], positions [T]): every rule
// but the element types and the devices.
inline void check_kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& rows, const at::Tensor& positions,
                                 const char* op) {
  check_dim(k_cache, 4, op, "k_cache [B, Hkv, S, D]");
  check_dim(v_cache, 4, op, "v_cache [B, Hkv, S, D]");
  check_dim(key, 3, op, "key [T, Hkv, D]");
  check_dim(value, 3, op, "value [T, Hkv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have the shape of key ", key.sizes(), ", got ",
              value.sizes());
  const int64_t heads = k_cache.size(1), head_dim = k_cache.size(3), tokens = key.size(0);
  TORCH_CHECK(key.size(1) == heads && key.size(2) == head_dim, op, ": key must have shape [T, ", heads, ", ", head_dim,
              "] to match k_cache ", k_cache.sizes(), ", got ", key.sizes());
  check_vector_shape(rows, tokens, at::kLong, op, "rows");
  check_vector_shape(positions, tokens, at::kLong, op, "positions");
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  check_last_dim_dense(key, op, "key");
  check_last_dim_dense(value, op, "value");
}

}  // namespace shapes
}  // namespace layerskip
