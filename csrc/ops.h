// Declarations of the CPU kernels of every op (the schemas and their meaning live in torch_bindings.cpp).
// Every op writes into caller-owned outputs (the first arguments) and returns nothing.
// Shapes: T = tokens in the step (flattened over rows), B = cache rows, H = hidden size, Hq / Hkv = query /
// key-value heads, D = head_dim, S = cache positions per row, V = vocabulary, I = MLP intermediate size,
// d = maximal draft length.
#pragma once
#include <torch/all.h>

namespace layerskip {

// Row counts up to which `linear` runs the batch-invariant skinny kernel (each weight row read once).
constexpr int64_t kLinearSkinnyMaxTokens = 64;

void rms_norm_cpu(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& weight, double eps);
void fused_add_rms_norm_cpu(torch::Tensor& out, const torch::Tensor& input, torch::Tensor& residual,
                            const torch::Tensor& weight, double eps);
void rotary_embedding_cpu(torch::Tensor& query, torch::Tensor& key, const torch::Tensor& positions,
                          const torch::Tensor& cos_sin_cache);
void kv_cache_write_cpu(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& key,
                        const torch::Tensor& value, const torch::Tensor& rows, const torch::Tensor& positions);
void attention_cpu(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& rows, const torch::Tensor& positions,
                   double scale);
void silu_and_mul_cpu(torch::Tensor& out, const torch::Tensor& input);
void linear_cpu(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& weight);
void sampling_probs_cpu(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
                        const torch::Tensor& top_k, const torch::Tensor& top_p);
void sample_from_probs_cpu(torch::Tensor& out, const torch::Tensor& probs, const torch::Tensor& seeds,
                           const torch::Tensor& counters);
void sample_cpu(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
                const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& seeds,
                const torch::Tensor& counters);
void speculative_accept_greedy_cpu(torch::Tensor& tokens, torch::Tensor& num_accepted,
                                   const torch::Tensor& draft_tokens, const torch::Tensor& draft_lengths,
                                   const torch::Tensor& target_logits);
void speculative_accept_cpu(torch::Tensor& tokens, torch::Tensor& num_accepted, const torch::Tensor& draft_tokens,
                            const torch::Tensor& draft_lengths, const torch::Tensor& draft_probs,
                            const torch::Tensor& target_probs, const torch::Tensor& seeds,
                            const torch::Tensor& counters);

// packed GGUF blocks (cpu/quant_linear.cpp)
torch::Tensor linear_quantized_cpu(const torch::Tensor& input, const torch::Tensor& packed, int64_t format,
                                   int64_t out_features, int64_t in_features);
torch::Tensor& linear_quantized_out_cpu(const torch::Tensor& input, const torch::Tensor& packed, int64_t format,
                                        int64_t out_features, int64_t in_features, torch::Tensor& out);
torch::Tensor dequantize_rows_cpu(const torch::Tensor& packed, int64_t format, int64_t out_features,
                                  int64_t in_features, const torch::Tensor& ids);
torch::Tensor interleave_quantized_cpu(const torch::Tensor& packed, int64_t format, int64_t out_features,
                                      int64_t in_features);
std::vector<std::string> attention_kernels_cpu();
std::string attention_kernel_cpu();
void set_attention_kernel_cpu(const std::string& name);
bool work_pool_enabled_cpu();
std::vector<std::string> quant_kernels_cpu();
std::string quant_kernel_cpu();
void set_quant_kernel_cpu(const std::string& name);
std::string quant_activations_cpu();
void set_quant_activations_cpu(const std::string& name);

}  // namespace layerskip
