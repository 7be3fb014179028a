// Allocation and growth of the engine's resident buffers.
#include "engine/buffers.h"

#include "engine/huge_pages.h"

#include <algorithm>

namespace layerskip {
namespace engine {

Buffers::Buffers(const ModelShape& shape, at::TensorOptions float_options) : shape_(shape), options_(float_options) {}

void Buffers::reserve(int64_t rows, int64_t capacity) {
  if (rows <= rows_ && capacity <= capacity_) return;
  const int64_t new_rows = std::max(rows, rows_), new_capacity = std::max(capacity, capacity_);
  const auto& s = shape_;
  for (int64_t i = 0; i < s.num_layers; ++i) {
    for (auto* cache : {&k_cache, &v_cache}) {
      at::Tensor grown = huge_page_zeros({new_rows, s.num_kv_heads, new_capacity, s.head_dim}, options_);  // [B, Hkv, S, D]
      if (static_cast<int64_t>(cache->size()) > i) {
        grown.narrow(0, 0, rows_).narrow(2, 0, capacity_).copy_((*cache)[i]);
        (*cache)[i] = grown;
      } else {
        cache->push_back(grown);
      }
    }
  }
  rows_ = new_rows;
  capacity_ = new_capacity;
  ++generation_;
}

void Buffers::release() {
  k_cache.clear();
  v_cache.clear();
  rows_ = 0;
  capacity_ = 0;
  ++generation_;
}

int64_t Buffers::bytes_for(int64_t rows, int64_t capacity) const {
  const int64_t element = static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options_.dtype())));
  return 2 * shape_.num_layers * rows * shape_.num_kv_heads * capacity * shape_.head_dim * element;
}

at::Tensor Buffers::scratch(const std::string& name, at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t n : sizes) numel *= n;
  at::Tensor& buf = (*active_)[name];
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < numel) {
    buf = at::empty({std::max<int64_t>(numel, 1)}, options_.dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

}  // namespace engine
}  // namespace layerskip
