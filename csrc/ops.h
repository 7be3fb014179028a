// Declarations of every layerskip op (the schemas and their meaning live in torch_bindings.cpp).
// Shapes: T = tokens in the step (1 for a decode step, d for a verify block, prompt length for
// prefill), H = hidden size, Hq / Hkv = query / key-value heads, D = head_dim, S = cache capacity,
// V = vocabulary, I = MLP intermediate size.
#pragma once
#include <torch/all.h>

#include <tuple>

namespace layerskip {

torch::Tensor rms_norm_cpu(const torch::Tensor& input, const torch::Tensor& weight, double eps);
torch::Tensor fused_add_rms_norm_cpu(const torch::Tensor& input, torch::Tensor& residual,
                                     const torch::Tensor& weight, double eps);
void rotary_embedding_cpu(torch::Tensor& query, torch::Tensor& key, const torch::Tensor& positions,
                          const torch::Tensor& cos_sin_cache);
void kv_cache_write_cpu(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& key,
                        const torch::Tensor& value, const torch::Tensor& slots);
torch::Tensor attention_cpu(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            int64_t start_pos, double scale);
torch::Tensor silu_and_mul_cpu(const torch::Tensor& input);
torch::Tensor linear_cpu(const torch::Tensor& input, const torch::Tensor& weight);
torch::Tensor sampling_probs_cpu(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p);
torch::Tensor sample_from_probs_cpu(const torch::Tensor& probs, int64_t seed, int64_t offset);
torch::Tensor sample_cpu(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p, int64_t seed,
                         int64_t offset);
std::tuple<torch::Tensor, torch::Tensor> speculative_accept_greedy_cpu(const torch::Tensor& draft_tokens,
                                                                       const torch::Tensor& target_logits);
std::tuple<torch::Tensor, torch::Tensor> speculative_accept_cpu(const torch::Tensor& draft_tokens,
                                                                const torch::Tensor& draft_probs,
                                                                const torch::Tensor& target_probs, int64_t seed,
                                                                int64_t offset);

}  // namespace layerskip
