// CUDA kernel of attention: causal grouped-query attention of a few queries (a decode step, a verify block, a
// batch) against the KV cache. One block per (token, query head); its warps split the visible keys and keep
// an online softmax (running max, running sum, weighted value sum) each, merged at the end. Scores, softmax
// and sums in float32. Query t sees the first n_t cache slots (index.h: visible_keys), read from the
// positions tensor on the device when one is given, so the launch is the same at every step.
#include "cuda/common.cuh"
#include "cuda/index.h"

namespace layerskip {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDimPerLane = 8;  // head_dim <= 256

template <typename Q, typename C>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const Q* __restrict__ query, int64_t q0, int64_t q1, const C* __restrict__ k_cache,
                     const C* __restrict__ v_cache, Q* __restrict__ out, int64_t q_heads, int64_t batch,
                     int64_t kv_heads, int64_t capacity, int64_t head_dim, const int64_t* __restrict__ rows,
                     int64_t start_pos, const int64_t* __restrict__ positions, float scale) {
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_acc[kWarps][kMaxDimPerLane * 32];
  const int64_t t = blockIdx.x / q_heads, h = blockIdx.x % q_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = visible_keys(start_pos, t, positions != nullptr ? positions[t] : -1, capacity);
  bool row_out_of_range;
  const int64_t row = rows != nullptr ? clamp_index(rows[t], batch, &row_out_of_range) : 0;
  const int64_t kvh = row * kv_heads + kv_head_of(h, q_heads, kv_heads);  // [B, Hkv] flattened
  const C* k = k_cache + cache_offset(kvh, 0, capacity, head_dim);
  const C* v = v_cache + cache_offset(kvh, 0, capacity, head_dim);

  float q[kMaxDimPerLane], acc[kMaxDimPerLane];
  const Q* qr = query + t * q0 + h * q1;
#pragma unroll
  for (int m = 0; m < kMaxDimPerLane; ++m) {
    const int64_t d = lane + 32 * m;
    q[m] = d < head_dim ? to_float(qr[d]) * scale : 0.f;
    acc[m] = 0.f;
  }
  float run_max = -INFINITY, run_sum = 0.f;
  for (int64_t j = warp; j < n; j += kWarps) {
    const C* kj = k + j * head_dim;
    float partial = 0.f;
#pragma unroll
    for (int m = 0; m < kMaxDimPerLane; ++m) {
      const int64_t d = lane + 32 * m;
      if (d < head_dim) partial += q[m] * to_float(kj[d]);
    }
    const float s = warp_sum(partial);
    const float new_max = fmaxf(run_max, s);
    const float correction = expf(run_max - new_max);  // 0 on the first key (run_max = -inf)
    const float p = expf(s - new_max);
    run_sum = run_sum * correction + p;
    const C* vj = v + j * head_dim;
#pragma unroll
    for (int m = 0; m < kMaxDimPerLane; ++m) {
      const int64_t d = lane + 32 * m;
      acc[m] = acc[m] * correction + (d < head_dim ? p * to_float(vj[d]) : 0.f);
    }
    run_max = new_max;
  }
  if (lane == 0) {
    s_max[warp] = run_max;
    s_sum[warp] = run_sum;
  }
#pragma unroll
  for (int m = 0; m < kMaxDimPerLane; ++m) s_acc[warp][lane + 32 * m] = acc[m];
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, s_max[w]);
  float weight[kWarps], total = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_max[w] == -INFINITY ? 0.f : expf(s_max[w] - total_max);  // warps that saw no key: 0
    total += s_sum[w] * weight[w];
  }
  const float inv_total = 1.0f / total;
  Q* o = out + (t * q_heads + h) * head_dim;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float r = 0.f;
    for (int w = 0; w < kWarps; ++w) r += s_acc[w][d] * weight[w];
    o[d] = from_float<Q>(r * inv_total);
  }
}

}  // namespace

cudaError_t attention(DType qt, DType ct, const void* query, int64_t q0, int64_t q1, const void* k_cache,
                      const void* v_cache, void* out, int64_t tokens, int64_t q_heads, int64_t batch, int64_t kv_heads,
                      int64_t capacity, int64_t head_dim, const int64_t* rows, int64_t start_pos,
                      const int64_t* positions, float scale, cudaStream_t stream) {
  if (tokens == 0 || q_heads == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim > kMaxDimPerLane * 32 || kv_heads <= 0 || q_heads % kv_heads != 0 || capacity < 1 || batch < 1) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = tokens * q_heads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(qt, [&](auto q_tag) {
    using Q = decltype(q_tag);
    return dispatch_dtype(ct, [&](auto c_tag) {
      using C = decltype(c_tag);
      attention_kernel<Q, C><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
          static_cast<const Q*>(query), q0, q1, static_cast<const C*>(k_cache), static_cast<const C*>(v_cache),
          static_cast<Q*>(out), q_heads, batch, kv_heads, capacity, head_dim, rows, start_pos, positions, scale);
      return launch_status();
    });
  });
}

}  // namespace cuda
}  // namespace layerskip
