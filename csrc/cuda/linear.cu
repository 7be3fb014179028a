// CUDA kernel of linear for a few rows (1..64: a decode step, a verify block, a batch): out [T, N] =
// x [T, K] @ w [N, K]^T. Decoding is memory bound, so the kernel streams each weight row once for all T rows:
// a warp (or `split` warps sharing one output column, for small N) reads its weight row in 16-byte chunks
// and multiplies every chunk against the T input rows (which stay in L1/L2), keeping T float32 accumulators
// per lane. Accumulation in float32 for every element type. Larger T goes to cuBLAS (the glue).
#include "cuda/common.cuh"
#include "cuda/index.h"

namespace layerskip {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kChunk = 8;  // elements per lane per step: 16 bytes of a 2-byte type

__device__ __forceinline__ void unpack(uint32_t bits, __nv_bfloat16*, float* f) {
  f[0] = __uint_as_float(bits << 16);
  f[1] = __uint_as_float(bits & 0xffff0000u);
}
__device__ __forceinline__ void unpack(uint32_t bits, __half*, float* f) {
  __half2 h;
  memcpy(&h, &bits, sizeof(h));
  const float2 v = __half22float2(h);
  f[0] = v.x;
  f[1] = v.y;
}

// f[0..8) = p[0..8) as float. kVec: p is 16-byte aligned.
template <bool kVec, typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
      f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      unpack(u.x, static_cast<T*>(nullptr), f);
      unpack(u.y, static_cast<T*>(nullptr), f + 2);
      unpack(u.z, static_cast<T*>(nullptr), f + 4);
      unpack(u.w, static_cast<T*>(nullptr), f + 6);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) f[i] = to_float(p[i]);
  }
}

// Grid: ceil(N / (8 / split)) blocks of 8 warps; warp w of a block serves column blockIdx.x * (8 / split) +
// w / split and part w % split of K. kVec: K % 8 == 0 and x, w rows 16-byte aligned; otherwise the main loop
// covers the multiple of 8 below K with scalar loads and a tail loop the rest.
template <typename X, typename W, int kMaxRows, bool kVec>
__global__ void __launch_bounds__(kThreads)
    linear_kernel(const X* __restrict__ x, int64_t x0, const W* __restrict__ w, X* __restrict__ out, int tokens,
                  int64_t n_cols, int64_t k_dim, int split) {
  __shared__ float partial[kWarpsPerBlock][kMaxRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cols_per_block = kWarpsPerBlock / split;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * cols_per_block + warp / split;
  const int part = warp % split;
  float acc[kMaxRows];
#pragma unroll
  for (int t = 0; t < kMaxRows; ++t) acc[t] = 0.f;
  if (col < n_cols) {
    const W* wr = w + col * k_dim;
    const int64_t k_main = k_dim / kChunk * kChunk;
    const int64_t stride = static_cast<int64_t>(32) * split * kChunk;
    for (int64_t k0 = (static_cast<int64_t>(part) * 32 + lane) * kChunk; k0 < k_main; k0 += stride) {
      float wf[kChunk];
      load8<kVec>(wr + k0, wf);
#pragma unroll
      for (int t = 0; t < kMaxRows; ++t) {
        if (t < tokens) {
          float xf[kChunk];
          load8<kVec>(x + t * x0 + k0, xf);
          float s = acc[t];
#pragma unroll
          for (int i = 0; i < kChunk; ++i) s = fmaf(wf[i], xf[i], s);
          acc[t] = s;
        }
      }
    }
    for (int64_t k = k_main + part * 32 + lane; k < k_dim; k += 32 * split) {  // tail: K % 8 elements
      const float wk = to_float(wr[k]);
#pragma unroll
      for (int t = 0; t < kMaxRows; ++t) {
        if (t < tokens) acc[t] = fmaf(wk, to_float(x[t * x0 + k]), acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxRows; ++t) {
    if (t < tokens) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) partial[warp][t] = s;
    }
  }
  __syncthreads();
  if (part == 0 && col < n_cols) {
    for (int t = lane; t < tokens; t += 32) {
      float s = 0.f;
      for (int p = 0; p < split; ++p) s += partial[warp + p][t];
      out[t * n_cols + col] = from_float<X>(s);
    }
  }
}

// Warps per column: enough blocks to keep every SM streaming even when N is small (~4096 warps in all).
int choose_split(int64_t n_cols, int64_t k_dim) {
  int split = 1;
  while (split < kWarpsPerBlock && n_cols * split < 4096 && k_dim >= static_cast<int64_t>(split) * 2 * 32 * kChunk) {
    split *= 2;
  }
  return split;
}

template <typename X, typename W, int kMaxRows>
cudaError_t launch_tile(const X* x, int64_t x0, const W* w, X* out, int tokens, int64_t n, int64_t k, bool vec,
                        cudaStream_t stream) {
  const int split = choose_split(n, k);
  const int64_t blocks = ceil_div(n, kWarpsPerBlock / split);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (vec) {
    linear_kernel<X, W, kMaxRows, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, x0, w, out, tokens,
                                                                                               n, k, split);
  } else {
    linear_kernel<X, W, kMaxRows, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, x0, w, out,
                                                                                                tokens, n, k, split);
  }
  return launch_status();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t linear_skinny(DType xt, DType wt, const void* x, int64_t x0, const void* w, void* out, int64_t tokens,
                          int64_t n, int64_t k, cudaStream_t stream) {
  if (tokens == 0 || n == 0) return cudaSuccess;
  const int tile = linear_row_tile(tokens);
  if (tile == 0) return cudaErrorInvalidValue;
  return dispatch_dtype(xt, [&](auto x_tag) {
    using X = decltype(x_tag);
    return dispatch_dtype(wt, [&](auto w_tag) {
      using W = decltype(w_tag);
      const bool vec = k % kChunk == 0 && aligned16(x) && aligned16(w) && (x0 * sizeof(X)) % 16 == 0;
      const X* xp = static_cast<const X*>(x);
      const W* wp = static_cast<const W*>(w);
      X* op = static_cast<X*>(out);
      const int t = static_cast<int>(tokens);
      if (tile == 1) return launch_tile<X, W, 1>(xp, x0, wp, op, t, n, k, vec, stream);
      if (tile == 8) return launch_tile<X, W, 8>(xp, x0, wp, op, t, n, k, vec, stream);
      return launch_tile<X, W, 64>(xp, x0, wp, op, t, n, k, vec, stream);
    });
  });
}

}  // namespace cuda
}  // namespace layerskip
