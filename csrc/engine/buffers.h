// Decoding state resident on the model's device: the batched KV cache and the step workspace.
//
// KV cache: per layer one [B, Hkv, S, D] buffer for keys and one for values. Each of the B cache rows is a
// contiguous slot of S positions (position p in slot p), so rolling a row back is moving its length, never a
// copy, and attention reads a row as one strided block. (Not paged: an engine holds a few dozen rows on our
// targets; contiguous slots keep the kernels free of block tables. The cost is that every row reserves S
// positions.) Buffers grow (keeping their contents) when a new row needs more rows or positions.
//
// Workspace: the outputs of every op of a step ([T, N] activations, logits, probabilities), grown to the
// largest step seen and narrowed to each step's T, so ops write into memory the engine owns.
#pragma once
#include <torch/all.h>

#include <string>
#include <unordered_map>
#include <vector>

#include "engine/weights.h"

namespace layerskip {
namespace engine {

class Buffers {
 public:
  std::vector<at::Tensor> k_cache, v_cache;  // per layer [B, Hkv, S, D] float32

  Buffers(const ModelShape& shape, at::TensorOptions float_options);

  int64_t rows() const { return rows_; }
  int64_t capacity() const { return capacity_; }

  // Grows the KV cache to at least `rows` rows of `capacity` positions, keeping what it holds.
  void reserve(int64_t rows, int64_t capacity);
  // Frees the KV cache (no rows, no positions); reserve allocates it again.
  void release();
  // Bytes of a KV cache of `rows` rows of `capacity` positions (keys and values of every layer); the current one's.
  int64_t bytes_for(int64_t rows, int64_t capacity) const;
  int64_t cache_bytes() const { return bytes_for(rows_, capacity_); }

  // The workspace tensor `name`, viewed as [sizes...] of `dtype`; its memory is reused across steps.
  at::Tensor scratch(const std::string& name, at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat);

  // Bumped whenever reserve() reallocates the KV cache: a captured CUDA graph holds the cache's addresses and
  // is recaptured when the generation it was captured at is gone.
  int64_t generation() const { return generation_; }
  // Routes scratch() to `workspace` (the buffers a captured CUDA graph owns, so that a later growth of the
  // shared workspace cannot free memory the graph writes), or back to the shared one with nullptr.
  using Workspace = std::unordered_map<std::string, at::Tensor>;
  void use_workspace(Workspace* workspace) { active_ = workspace != nullptr ? workspace : &scratch_; }

 private:
  ModelShape shape_;
  at::TensorOptions options_;
  int64_t rows_ = 0, capacity_ = 0;
  int64_t generation_ = 0;
  std::unordered_map<std::string, at::Tensor> scratch_;  // flat 1-D buffers by name
  std::unordered_map<std::string, at::Tensor>* active_ = &scratch_;
};

}  // namespace engine
}  // namespace layerskip
