// The model's weights in the engine's layout, built once from the HF-layout tensors.
//
// Per layer the q|k|v projections are fused into one [(Hq + 2 Hkv) D, H] matrix and gate|up into one
// [2I, H] matrix, so a decode step runs two matmuls where HF runs five. Matmul weights are stored in
// the chosen dtype (float32 or bfloat16, read by layerskip::linear), or kept as packed GGUF blocks
// (Q8_0 / Q4_0 / Q4_1: the file's bytes, read by layerskip::linear_quantized; the embedding too, looked up
// with layerskip::dequantize_rows); norms and a float embedding table stay float32.
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

// A weight matrix [out_features, in_features]: float data [N, K], or packed blocks [N, K / 32 * block bytes]
// uint8 in a GGUF format (2 = Q4_0, 3 = Q4_1, 8 = Q8_0; layouts in csrc/cpu/quant_kernels.h). build_weights
// stores packed matrices interleaved by 16 rows (1-D, format 1000 + the GGUF one; csrc/cpu/quant_interleave.h).
struct Matrix {
  at::Tensor data;
  int64_t format = 0;  // 0: float data
  int64_t out_features = 0, in_features = 0;

  bool packed() const { return format != 0; }
  int64_t bytes() const { return data.numel() * static_cast<int64_t>(data.element_size()); }
  // Rows `ids` [n] int64 of the matrix, in its own format (a packed row is whole blocks).
  Matrix rows(const at::Tensor& ids) const;
};

struct LayerWeights {
  at::Tensor input_norm;      // [H] float32
  Matrix qkv;                 // [(Hq + 2 Hkv) D, H]
  Matrix o;                   // [H, Hq D]
  at::Tensor post_attn_norm;  // [H] float32
  Matrix gate_up;             // [2I, H]
  Matrix down;                // [H, I]
};

struct ModelWeights {
  Matrix embed;           // [V, H] float32 or packed
  at::Tensor final_norm;  // [H] float32
  Matrix lm_head;         // [V, H] (shares the embedding's storage when tied and float32 or packed)
  std::vector<LayerWeights> layers;

  at::Device device() const { return final_norm.device(); }

  // The tensors one decode step through all layers and the head reads whole: the head, the final norm, and
  // every layer's norms and matrices (the embedding, of which a step reads one row, aside).
  std::vector<at::Tensor> step_tensors() const;
  // Number of weight bytes one decode step through all layers and the head reads (step_tensors and one
  // embedding row).
  int64_t bytes_per_token() const;
};

// `tensors` keyed by their Hugging Face names (model.embed_tokens.weight, model.norm.weight, lm_head.weight,
// model.layers.{i}.input_layernorm.weight, .self_attn.{q,k,v,o}_proj.weight, .post_attention_layernorm.weight,
// .mlp.{gate,up,down}_proj.weight). A missing lm_head.weight means a tied head (the embedding). Checks every
// name and shape; names the engine does not use are an error (a typo must not go unnoticed).
// formats: the matrices given as packed GGUF blocks, by name -> GGUF format (their tensors are uint8
// [N, K / 32 * block bytes], CPU only); matrices fused together (q|k|v, gate|up) must share a format.
ModelWeights build_weights(const ModelShape& shape, const c10::Dict<std::string, at::Tensor>& tensors,
                           const c10::Dict<std::string, int64_t>& formats, at::ScalarType matmul_dtype);

}  // namespace engine
}  // namespace layerskip
