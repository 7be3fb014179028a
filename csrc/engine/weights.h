// The model's weights in the engine's layout, built once from the HF-layout tensors.
//
// Per layer the q|k|v projections are fused into one [(Hq + 2 Hkv) D, H] matrix and gate|up into one
// [2I, H] matrix, so a decode step runs two matmuls where HF runs five. Matmul weights are stored in
// the chosen dtype (float32 or bfloat16, read by layerskip::linear); norms and the embedding table
// stay float32.
#pragma once
#include <torch/all.h>

#include <string>
#include <vector>

namespace layerskip {
namespace engine {

struct ModelShape {
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab;
  double rms_norm_eps;

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

struct LayerWeights {
  at::Tensor input_norm;      // [H] float32
  at::Tensor qkv;             // [(Hq + 2 Hkv) D, H]
  at::Tensor o;               // [H, Hq D]
  at::Tensor post_attn_norm;  // [H] float32
  at::Tensor gate_up;         // [2I, H]
  at::Tensor down;            // [H, I]
};

struct ModelWeights {
  at::Tensor embed;       // [V, H] float32
  at::Tensor final_norm;  // [H] float32
  at::Tensor lm_head;     // [V, H] (shares the embedding's storage when tied and float32)
  std::vector<LayerWeights> layers;

  // Number of weight bytes one decode step through all layers and the head reads.
  int64_t bytes_per_token() const;
};

// `tensors` keyed by their Hugging Face names (model.embed_tokens.weight, model.norm.weight, lm_head.weight,
// model.layers.{i}.input_layernorm.weight, .self_attn.{q,k,v,o}_proj.weight, .post_attention_layernorm.weight,
// .mlp.{gate,up,down}_proj.weight). A missing lm_head.weight means a tied head (the embedding). Checks every
// name and shape; names the engine does not use are an error (a typo must not go unnoticed).
ModelWeights build_weights(const ModelShape& shape, const c10::Dict<std::string, at::Tensor>& tensors,
                           at::ScalarType matmul_dtype);

}  // namespace engine
}  // namespace layerskip
