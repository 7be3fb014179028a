// Allocation and growth of the engine's resident buffers.
#include "engine/buffers.h"

namespace layerskip {
namespace engine {

Buffers::Buffers(const ModelShape& shape, at::TensorOptions float_options)
    : shape_(shape), options_(float_options) {
  residual = at::empty({1, shape.hidden}, options_);
  last_token = at::zeros({1}, options_.dtype(at::kLong));
  draft_probs = at::empty({0, shape.vocab}, options_);
  reserve_speculations(0, false);
}

void Buffers::reserve_positions(int64_t capacity) {
  if (capacity <= capacity_) return;
  const auto& s = shape_;
  k_cache.clear();  // free the old buffers before allocating the new ones
  v_cache.clear();
  for (int64_t i = 0; i < s.num_layers; ++i) {
    k_cache.push_back(at::zeros({s.num_kv_heads, capacity, s.head_dim}, options_));  // [Hkv, S, D]
    v_cache.push_back(at::zeros({s.num_kv_heads, capacity, s.head_dim}, options_));
  }
  positions = at::arange(capacity, options_.dtype(at::kLong));  // [S]
  capacity_ = capacity;
}

void Buffers::reserve_speculations(int64_t num_speculations, bool sampled) {
  if (num_speculations > max_speculations_) {
    exit_query_cache = at::empty({num_speculations + 1, shape_.hidden}, options_);  // [d_max + 1, H]
    draft_tokens = at::zeros({num_speculations}, options_.dtype(at::kLong));        // [d_max]
    max_speculations_ = num_speculations;
  }
  if (sampled && draft_probs.size(0) < max_speculations_) {
    draft_probs = at::empty({max_speculations_, shape_.vocab}, options_);  // [d_max, V]
  }
}

}  // namespace engine
}  // namespace layerskip
