// Launchers of the CUDA kernels: plain C++ declarations on raw device pointers and a cudaStream_t, so that
// the torch glue (csrc/cuda/*_cuda.cpp) includes no CUDA kernel code and the .cu files include no torch
// header. Every launcher returns the cudaError_t of its launches (cudaSuccess when all were accepted);
// the glue turns a failure into a Python exception (C10_CUDA_CHECK).
//
// Element types are named by DType; a void* argument holds elements of the DType given beside it.
// Tensors are row-major; "stride" arguments count elements.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace layerskip {
namespace cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// ---- norm_act.cu
// out [rows, H] = in / rms(in) * w (in, out of type t; w of type wt).
cudaError_t rms_norm(DType t, DType wt, const void* in, const void* w, void* out, int64_t rows, int64_t hidden,
                     float eps, cudaStream_t stream);
// residual [rows, H] += in (rounded to t), out = rms_norm(residual).
cudaError_t fused_add_rms_norm(DType t, DType wt, const void* in, void* residual, const void* w, void* out,
                               int64_t rows, int64_t hidden, float eps, cudaStream_t stream);
// in [rows, 2I] = gate | up -> out [rows, I] = silu(gate) * up.
cudaError_t silu_and_mul(DType t, const void* in, void* out, int64_t rows, int64_t inter, cudaStream_t stream);

// ---- rotary_kv.cu
// In place rotate-half rotary embedding of x [T, H, D] (strides st, sh; stride 1 over D) at positions [T]
// (device int64). cos_sin [max_pos, D] of type ct. A position outside [0, max_pos) is clamped into it and
// counted in *bad (device int32, may be null).
cudaError_t rotary_embedding(DType t, DType ct, void* x, int64_t tokens, int64_t heads, int64_t st, int64_t sh,
                             const int64_t* positions, const void* cos_sin, int64_t max_pos, int64_t head_dim,
                             int32_t* bad, cudaStream_t stream);
// cache [B, Hkv, S, D] (type ct, contiguous; row b at cache + b * Hkv * S * D) at row rows[t] (null: row 0),
// slot slots[t] <- src [T, Hkv, D] (type src_t, strides s0, s1). A token whose row is outside [0, B) or slot
// outside [0, S) is skipped and counted in *bad (device int32, may be null).
cudaError_t kv_cache_write(DType ct, DType src_t, void* cache, const void* src, int64_t s0, int64_t s1,
                           const int64_t* rows, const int64_t* slots, int64_t tokens, int64_t batch, int64_t heads,
                           int64_t capacity, int64_t head_dim, int32_t* bad, cudaStream_t stream);

// ---- attention.cu
// out [T, Hq, D] (contiguous, type qt) = causal GQA attention of query [T, Hq, D] (strides q0, q1) against
// caches [B, Hkv, S, D] (type ct, contiguous). Query t reads cache row rows[t] (null: row 0; clamped into
// [0, B)) and sees its slots [0, n_t) with n_t = positions[t] + 1 when positions (device int64 [T]) is given,
// else start_pos + t + 1; n_t is clamped to [1, S].
cudaError_t attention(DType qt, DType ct, const void* query, int64_t q0, int64_t q1, const void* k_cache,
                      const void* v_cache, void* out, int64_t tokens, int64_t q_heads, int64_t batch, int64_t kv_heads,
                      int64_t capacity, int64_t head_dim, const int64_t* rows, int64_t start_pos,
                      const int64_t* positions, float scale, cudaStream_t stream);

// ---- linear.cu
// out [T, N] (type xt, contiguous) = x [T, K] (type xt, row stride x0) @ w [N, K]^T (type wt, contiguous),
// accumulated in float32; each weight row is read once for all T rows. 1 <= T <= kSkinnyMaxRows.
constexpr int64_t kSkinnyMaxRows = 64;
cudaError_t linear_skinny(DType xt, DType wt, const void* x, int64_t x0, const void* w, void* out, int64_t tokens,
                          int64_t n, int64_t k, cudaStream_t stream);

// ---- sampling.cu (per-row parameters and random counters are device arrays: a step is graph-capturable)
// Per-row filtering parameters: temperature [T] (0: one-hot of the first argmax), top_k [T] (0: all), top_p [T]
// in (0, 1]. A null array means the scalar beside it for every row.
struct FilterParams {
  const double* temperature = nullptr;
  const int64_t* top_k = nullptr;
  const double* top_p = nullptr;
  double temperature_all = 1.0;
  int64_t top_k_all = 0;
  double top_p_all = 1.0;
};
// Random draws of row t: counter counters[t] (+ k for its k-th draw) of seed seeds[t]; null arrays mean the
// scalar seed for every row and counter offset + t.
struct DrawParams {
  const int64_t* seeds = nullptr;
  const int64_t* counters = nullptr;
  int64_t seed_all = 0;
  int64_t offset = 0;
};

// probs [T, V] float32 = filtered softmax of logits [T, V] (type lt) (see csrc/cpu/sampling.cpp for the exact
// rule). A row whose maximum is not finite, or whose parameters are out of range, gets all-zero probabilities
// (the CPU op raises).
cudaError_t sampling_probs(DType lt, const void* logits, float* probs, int64_t rows, int64_t vocab, FilterParams f,
                           cudaStream_t stream);
// tokens [T] int64: row t inverts the CDF of probs [T, V] at its draw times the row's mass. Entries that are
// negative or not finite count as 0; a row without positive mass gets -1 (the CPU op raises).
cudaError_t sample_from_probs(const float* probs, int64_t* tokens, int64_t rows, int64_t vocab, DrawParams r,
                              cudaStream_t stream);
// tokens [T] int64 = first index of each row's maximum of logits [T, V] (type lt); -1 for a row holding a NaN or
// +inf or without a finite maximum (the CPU ops raise).
cudaError_t argmax_rows(DType lt, const void* logits, int64_t* tokens, int64_t rows, int64_t vocab,
                        cudaStream_t stream);
// Greedy verification of B rows: draft [B, d], draft_lengths [B] (null: d for every row; clamped into [0, d]),
// target_logits [B, d+1, V] (type lt) -> tokens [B, d+1] (-1 past the last valid entry, and for a target row that
// argmax_rows rejects), num_accepted [B].
// scratch: B * (d+1) int64 of device memory (the argmax of every target row).
cudaError_t speculative_accept_greedy(DType lt, const int64_t* draft, const int64_t* draft_lengths,
                                      const void* target_logits, int64_t batch, int64_t d, int64_t vocab,
                                      int64_t* scratch, int64_t* tokens, int64_t* num_accepted, cudaStream_t stream);
// Rejection sampling of B rows (semantics of csrc/cpu/speculative.cpp): draft [B, d], draft_probs [B, d, V],
// target_probs [B, d+1, V] float32 -> tokens [B, d+1], num_accepted [B]. Row b draws from counter counters[b]
// (+ 2i, 2i + 1, 2 d_b) of seeds[b] (DrawParams: offset + 0 for every row when counters is null). A draft token
// outside [0, V) is rejected; invalid probability entries count as 0; a draw from a row without positive mass
// gives -1.
cudaError_t speculative_accept(const int64_t* draft, const int64_t* draft_lengths, const float* draft_probs,
                               const float* target_probs, int64_t batch, int64_t d, int64_t vocab, DrawParams r,
                               int64_t* tokens, int64_t* num_accepted, cudaStream_t stream);

}  // namespace cuda
}  // namespace layerskip
