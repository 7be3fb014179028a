// The one registration block of the `layerskip` op library: every schema, with what it computes.
// Kernels register themselves per backend (csrc/cpu/*.cpp: CPU, csrc/cuda/*_cuda.cpp: CUDA).
// Random draws come from csrc/random.h: draw k of an op uses counter `offset + k` of `seed`.
#include <torch/library.h>

TORCH_LIBRARY(layerskip, m) {
  // input [..., H], weight [H] -> input / rms(input) * weight, [..., H]
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  // residual += input (in place); returns rms_norm(residual, weight, eps)
  m.def("fused_add_rms_norm(Tensor input, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  // In place, rotate-half (HF Llama) layout. query [T, Hq, D], key [T, Hkv, D], positions [T] int64,
  // cos_sin_cache [max_pos, D]: cos of the D/2 frequencies, then their sin.
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin_cache) -> ()");
  // k_cache[:, slots[t]] = key[t], v_cache[:, slots[t]] = value[t] (in place).
  // caches [Hkv, S, D]; key, value [T, Hkv, D]; slots [T] int64 in [0, S)
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor slots) -> ()");
  // Causal attention of T queries against the cache; query t sits at position start_pos + t and sees
  // cache slots [0, start_pos + t]. GQA: query head h reads kv head h / (Hq / Hkv).
  // query [T, Hq, D], caches [Hkv, S, D] -> [T, Hq, D]
  m.def("attention(Tensor query, Tensor k_cache, Tensor v_cache, int start_pos, float scale) -> Tensor");
  // input [..., 2I] = gate | up -> silu(gate) * up, [..., I]
  m.def("silu_and_mul(Tensor input) -> Tensor");
  // input [T, K] float32, weight [N, K] float32 or bfloat16 -> input @ weight.T, [T, N] float32.
  // T <= 16 (a decode step or a verify block) runs our skinny kernel reading each weight row once.
  m.def("linear(Tensor input, Tensor weight) -> Tensor");
  // logits [T, V] -> probabilities [T, V] of softmax(logits / temperature) restricted to the top_k
  // (0: all) and to the smallest top-probability set whose mass reaches top_p, renormalised.
  m.def("sampling_probs(Tensor logits, float temperature, int top_k, float top_p) -> Tensor");
  // probs [T, V] (rows need not sum to 1) -> [T] int64; row t inverts the CDF at draw t.
  m.def("sample_from_probs(Tensor probs, int seed, int offset) -> Tensor");
  // logits [T, V] -> [T] int64: argmax if temperature == 0, else sample_from_probs(sampling_probs(...)).
  m.def("sample(Tensor logits, float temperature, int top_k, float top_p, int seed, int offset) -> Tensor");
  // Greedy verification. draft_tokens [d] int64, target_logits [d+1, V] ->
  // (tokens [d+1] int64, num_accepted [] int64): n = longest prefix where draft == argmax(target);
  // tokens[:n] = draft[:n], tokens[n] = argmax(target_logits[n]); entries past n are -1.
  m.def("speculative_accept_greedy(Tensor draft_tokens, Tensor target_logits) -> (Tensor, Tensor)");
  // Rejection sampling. draft_tokens [d], draft_probs [d, V], target_probs [d+1, V] -> same outputs.
  // Step i accepts draft[i] if draw (2i) < target[i, x] / draft[i, x]; on rejection tokens[i] is drawn
  // (draw 2i + 1) from max(0, target[i] - draft[i]) renormalised; if all d are accepted,
  // tokens[d] is drawn (draw 2d) from target[d]. The output follows the target distribution.
  m.def(
      "speculative_accept(Tensor draft_tokens, Tensor draft_probs, Tensor target_probs, int seed, int offset) "
      "-> (Tensor, Tensor)");
}
