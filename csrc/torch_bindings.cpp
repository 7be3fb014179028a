// The one registration block of the `layerskip` op library: every schema, with what it computes.
// Kernels register themselves per backend (csrc/cpu/*.cpp: CPU, csrc/cuda/*_cuda.cpp: CUDA).
//
// Conventions (chosen so that a whole decode / draft / verify step can be captured once as a CUDA graph):
// - Destination passing: every op writes into tensors the caller owns (`Tensor(a!) out`, preallocated with the
//   shape and dtype given below) and returns nothing; no op allocates its result.
// - Flattened ("varlen") tokens: a step processes T tokens drawn from any rows of a batch. Token t carries its
//   cache row rows[t] and its position positions[t] (int64 device tensors), so ragged rows, per-row draft
//   lengths and mixed prefill / decode tokens share one schema.
// - Nothing that changes from step to step is a host scalar: positions, rows, per-token sampling parameters,
//   seeds and random counters are device tensors that the kernels read. Host scalars (eps, scale) are
//   properties of the model.
// - Random draws come from csrc/random.h: draw k of a token or row uses counter `counters[.] + k` of
//   `seeds[.]`, a pure function, so CPU and CUDA kernels and the Python reference draw the same numbers.
// - Batch invariance: every output element is computed with a reduction order that does not depend on T or on
//   where a token sits in the step, so row i of a batch gets exactly the numbers of a batch-1 run.
// Shapes: T tokens, B cache rows, H hidden, Hq / Hkv heads, D head_dim, S cache positions per row, V vocab,
// I MLP intermediate, d maximal draft length.
#include <torch/library.h>

TORCH_LIBRARY(layerskip, m) {
  // out [..., H] = input [..., H] / rms(input) * weight [H]; out has input's shape and dtype.
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  // residual += input (in place, contiguous residual); out = rms_norm(residual, weight, eps).
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // In place, rotate-half (HF Llama) layout. query [T, Hq, D], key [T, Hkv, D], positions [T] int64,
  // cos_sin_cache [max_pos, D]: cos of the D/2 frequencies, then their sin.
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin_cache) -> ()");
  // k_cache[rows[t], :, positions[t]] = key[t], likewise v (in place).
  // caches [B, Hkv, S, D]; key, value [T, Hkv, D]; rows [T] int64 in [0, B); positions [T] int64 in [0, S).
  // Each row owns a contiguous slot of S positions (position p in slot p): rolling a row back is moving its
  // length. (Not paged: one engine holds a few dozen rows at most on our targets, and contiguous slots keep
  // attention a plain strided loop; a paged layout would add a block table and an indirection per key.)
  m.def(
      "kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor rows, "
      "Tensor positions) -> ()");
  // Causal GQA attention: token t attends to slots [0, positions[t]] of cache row rows[t] (its own key must
  // be written first). Query head h reads kv head h / (Hq / Hkv).
  // out, query [T, Hq, D]; caches [B, Hkv, S, D]; rows, positions [T] int64.
  m.def(
      "attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor positions, "
      "float scale) -> ()");
  // The CPU kernels of attention this CPU can run, best first ("avx512", "avx2", "plain"), the one in use, and forcing
  // one ("auto": the best; also LAYERSKIP_ATTENTION_KERNEL, read once).
  m.def("attention_kernels() -> str[]");
  m.def("attention_kernel() -> str");
  m.def("set_attention_kernel(str name) -> ()");
  // out [..., I] = silu(gate) * up of input [..., 2I] = gate | up.
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  // out [T, N] float32 = input [T, K] float32 @ weight [N, K].T, weight float32, bfloat16 or float16.
  // T <= 64 (decode steps, verify blocks, batches of them): each weight row is read once for all T rows and
  // every output element has one reduction order whatever T is (batch invariant). Larger T (prefill) may use
  // a GEMM library, whose order depends on T.
  m.def("linear(Tensor(a!) out, Tensor input, Tensor weight) -> ()");
  // The kernels this CPU can run for linear with T <= 64 rows, best first ("avx512", "avx2", "plain"), the one
  // in use, and forcing one ("auto": the best; also LAYERSKIP_LINEAR_KERNEL, read once).
  m.def("linear_kernels() -> str[]");
  m.def("linear_kernel() -> str");
  m.def("set_linear_kernel(str name) -> ()");
  // Whether the CPU ops' parallel loops run on the work-claiming pool (csrc/cpu/work_pool.h) or, with
  // LAYERSKIP_WORK_POOL=0 (read once), on ATen's OpenMP team.
  m.def("work_pool_enabled() -> bool");
  // out [T, V] float32: probabilities of logits [T, V] after per-token filtering. temperature [T] float64
  // (0: one-hot of the first argmax, so greedy and sampled tokens share every downstream op),
  // top_k [T] int64 (0: off), top_p [T] float64 in (0, 1]. Row t = softmax(logits[t] / temperature[t])
  // restricted to its top_k, then to the smallest top-probability prefix whose mass reaches top_p,
  // renormalised.
  m.def("sampling_probs(Tensor(a!) out, Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p) -> ()");
  // out [T] int64: row t of probs [T, V] (rows >= 0, need not sum to 1) inverts its CDF at the draw
  // counters[t] of seeds[t] (seeds, counters [T] int64).
  m.def("sample_from_probs(Tensor(a!) out, Tensor probs, Tensor seeds, Tensor counters) -> ()");
  // out [T] int64: argmax of logits[t] where temperature[t] == 0, else
  // sample_from_probs(sampling_probs(logits, ...), seeds, counters) for that token.
  m.def(
      "sample(Tensor(a!) out, Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds, "
      "Tensor counters) -> ()");
  // Greedy verification of B rows at once. draft_tokens [B, d] int64, draft_lengths [B] int64 in [0, d]
  // (row b uses its first d_b drafts), target_logits [B, d + 1, V] (row b uses its first d_b + 1) ->
  // tokens [B, d + 1] int64, num_accepted [B] int64: n_b = longest prefix where draft == argmax(target);
  // tokens[b, :n_b] = drafts, tokens[b, n_b] = argmax(target_logits[b, n_b]); entries past n_b are -1.
  m.def(
      "speculative_accept_greedy(Tensor(a!) tokens, Tensor(b!) num_accepted, Tensor draft_tokens, "
      "Tensor draft_lengths, Tensor target_logits) -> ()");
  // Rejection sampling of B rows at once, same outputs. draft_probs [B, d, V], target_probs [B, d + 1, V],
  // seeds, counters [B] int64. Row b, step i accepts draft[b, i] if draw (2i) < target[i, x] / draft[i, x];
  // on rejection tokens[b, i] is drawn (draw 2i + 1) from max(0, target[i] - draft[i]) renormalised; if all
  // d_b are accepted, tokens[b, d_b] is drawn (draw 2 d_b) from target[d_b]. The output follows the target.
  m.def(
      "speculative_accept(Tensor(a!) tokens, Tensor(b!) num_accepted, Tensor draft_tokens, Tensor draft_lengths, "
      "Tensor draft_probs, Tensor target_probs, Tensor seeds, Tensor counters) -> ()");
  // ---- packed GGUF blocks (csrc/cpu/quant_linear.cpp; formats numbered as GGUF: 2 = Q4_0, 3 = Q4_1, 8 = Q8_0)
  // The engine runs every matmul and the LM head of a model loaded with packed weights through these.
  // input [T, K] float32, packed [N, K / 32 * block bytes] uint8 (the file's blocks, N rows of K) ->
  // input @ dequantized(packed).T, [T, N] float32; input rows quantized per block of 32 to int8 (two levels by
  // default, see quant_activations).
  m.def("linear_quantized(Tensor input, Tensor packed, int format, int out_features, int in_features) -> Tensor");
  m.def(
      "linear_quantized.out(Tensor input, Tensor packed, int format, int out_features, int in_features, *, "
      "Tensor(a!) out) -> Tensor(a!)");
  // packed [N, K] as above, ids [T] int64 -> the dequantized rows ids, [T, K] float32 (embedding lookup).
  m.def("dequantize_rows(Tensor packed, int format, int out_features, int in_features, Tensor ids) -> Tensor");
  // packed [N, K] as above -> the same blocks interleaved by groups of 16 rows, 1-D uint8, the layout of format
  // 1000 + format that linear_quantized and dequantize_rows also take (cpu/quant_interleave.h; the engine's).
  m.def("interleave_quantized(Tensor packed, int format, int out_features, int in_features) -> Tensor");
  // The kernels this CPU can run for linear_quantized, best first ("avx512vnni", "avx512", "avx2", "plain"),
  // the one in use, and forcing one ("auto": the best; also LAYERSKIP_QUANT_KERNEL, read once).
  m.def("quant_kernels() -> str[]");
  m.def("quant_kernel() -> str");
  m.def("set_quant_kernel(str name) -> ()");
  // How linear_quantized rounds its input rows: "int8x2" (default: int8 codes plus int8 codes of the rounding
  // residual, int16-like accuracy) or "int8" (one level, as llama.cpp); also LAYERSKIP_QUANT_ACTIVATIONS.
  m.def("quant_activations() -> str");
  m.def("set_quant_activations(str name) -> ()");
}
