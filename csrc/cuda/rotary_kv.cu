// CUDA kernels of rotary_embedding (in place, per-token positions) and kv_cache_write (scatter of keys /
// values into the cache at per-token slots). Positions and slots are device tensors, so a step's launches do
// not depend on host integers (capturable in a CUDA graph); their range is enforced on the device (see
// launch.h) instead of by a host check that would need a synchronisation.
#include "cuda/common.cuh"
#include "cuda/index.h"

namespace layerskip {
namespace cuda {
namespace {

// One thread per (token, head, i < D/2) of x [T, H, D]: the pair (x[i], x[i + D/2]).
template <typename T, typename C>
__global__ void rotary_kernel(T* x, int64_t tokens, int64_t heads, int64_t st, int64_t sh,
                              const int64_t* __restrict__ positions, const C* __restrict__ cos_sin, int64_t max_pos,
                              int64_t half, int32_t* bad) {
  const int64_t total = tokens * heads * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, th = e / half, h = th % heads, t = th / heads;
    bool out_of_range;
    const int64_t pos = clamp_index(positions[t], max_pos, &out_of_range);
    if (out_of_range && bad != nullptr && h == 0 && i == 0) atomicAdd(bad, 1);
    const C* cs = cos_sin + pos * 2 * half;
    const float c = to_float(cs[i]), s = to_float(cs[half + i]);
    T* v = x + t * st + h * sh;
    const float x1 = to_float(v[i]), x2 = to_float(v[half + i]);
    v[i] = from_float<T>(x1 * c - x2 * s);
    v[half + i] = from_float<T>(x2 * c + x1 * s);
  }
}

// One thread per (token, head, i < D) of src [T, Hkv, D]. Duplicate slots: which token wins is unspecified
// (the CPU op keeps the last one).
template <typename C, typename S>
__global__ void kv_write_kernel(C* __restrict__ cache, const S* __restrict__ src, int64_t s0, int64_t s1,
                                const int64_t* __restrict__ rows, const int64_t* __restrict__ slots, int64_t tokens,
                                int64_t batch, int64_t heads, int64_t capacity, int64_t head_dim, int32_t* bad) {
  const int64_t total = tokens * heads * head_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % head_dim, th = e / head_dim, h = th % heads, t = th / heads;
    const int64_t slot = slots[t], row = rows != nullptr ? rows[t] : 0;
    if (slot < 0 || slot >= capacity || row < 0 || row >= batch) {
      if (bad != nullptr && h == 0 && i == 0) atomicAdd(bad, 1);
      continue;
    }
    cache[cache_offset(row * heads + h, slot, capacity, head_dim) + i] =
        from_float<C>(to_float(src[t * s0 + h * s1 + i]));
  }
}

}  // namespace

cudaError_t rotary_embedding(DType t, DType ct, void* x, int64_t tokens, int64_t heads, int64_t st, int64_t sh,
                             const int64_t* positions, const void* cos_sin, int64_t max_pos, int64_t head_dim,
                             int32_t* bad, cudaStream_t stream) {
  const int64_t half = head_dim / 2, total = tokens * heads * half;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = ceil_div_blocks(total, threads);
  return dispatch_dtype(t, [&](auto t_tag) {
    using T = decltype(t_tag);
    return dispatch_dtype(ct, [&](auto c_tag) {
      using C = decltype(c_tag);
      rotary_kernel<T, C><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          static_cast<T*>(x), tokens, heads, st, sh, positions, static_cast<const C*>(cos_sin), max_pos, half, bad);
      return launch_status();
    });
  });
}

cudaError_t kv_cache_write(DType ct, DType src_t, void* cache, const void* src, int64_t s0, int64_t s1,
                           const int64_t* rows, const int64_t* slots, int64_t tokens, int64_t batch, int64_t heads,
                           int64_t capacity, int64_t head_dim, int32_t* bad, cudaStream_t stream) {
  const int64_t total = tokens * heads * head_dim;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = ceil_div_blocks(total, threads);
  return dispatch_dtype(ct, [&](auto c_tag) {
    using C = decltype(c_tag);
    return dispatch_dtype(src_t, [&](auto s_tag) {
      using S = decltype(s_tag);
      kv_write_kernel<C, S><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          static_cast<C*>(cache), static_cast<const S*>(src), s0, s1, rows, slots, tokens, batch, heads, capacity, head_dim, bad);
      return launch_status();
    });
  });
}

}  // namespace cuda
}  // namespace layerskip
