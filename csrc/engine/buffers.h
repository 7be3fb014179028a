// Decoding state resident on the model's device, allocated once and reused across generations.
//
// KV cache: one static [Hkv, S, D] buffer per layer for keys and one for values; position p lives in
// slot p, so rolling back is moving a length, never a copy. Exit-query cache: [d_max + 1, H], the
// layer-E residual states of a speculative round (the verifier starts from them). Buffers grow only
// when a call needs more than they hold.
#pragma once
#include <torch/all.h>

#include <vector>

#include "engine/weights.h"

namespace layerskip {
namespace engine {

class Buffers {
 public:
  std::vector<at::Tensor> k_cache, v_cache;  // per layer [Hkv, S, D] float32
  at::Tensor positions;                      // [S] int64: 0, 1, ..., S - 1 (positions and slots of a step)
  at::Tensor exit_query_cache;               // [d_max + 1, H] float32
  at::Tensor draft_tokens;                   // [d_max] int64
  at::Tensor draft_probs;                    // [d_max, V] float32 (sampled drafting only)
  at::Tensor residual;                       // [1, H] float32: the residual stream of a decode step
  at::Tensor last_token;                     // [1] int64: the newest token, input of the next step

  Buffers(const ModelShape& shape, at::TensorOptions float_options);

  int64_t capacity() const { return capacity_; }
  int64_t max_speculations() const { return max_speculations_; }

  // Grows the KV cache to hold `capacity` positions (contents are not kept).
  void reserve_positions(int64_t capacity);
  // Grows the draft buffers to rounds of `num_speculations` tokens; `sampled` also needs draft_probs.
  void reserve_speculations(int64_t num_speculations, bool sampled);

 private:
  ModelShape shape_;
  at::TensorOptions options_;
  int64_t capacity_ = 0;
  int64_t max_speculations_ = -1;
};

}  // namespace engine
}  // namespace layerskip
