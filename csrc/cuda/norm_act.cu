// CUDA kernels of rms_norm, fused_add_rms_norm (one block per row, statistics in float32) and silu_and_mul
// (element-wise). Same arithmetic as csrc/cpu/norm.cpp and csrc/cpu/activation.cpp.
#include "cuda/common.cuh"

namespace layerskip {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;

// One block per row r of x [rows, H]: out = x * rsqrt(mean(x^2) + eps) * w. With `residual`, the row is
// residual += in first (rounded to T, as an out-of-place add would be).
template <typename T, typename W, bool kAdd>
__global__ void rms_norm_kernel(const T* __restrict__ in, T* __restrict__ residual, const W* __restrict__ w,
                                T* __restrict__ out, int64_t hidden, float eps) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x;
  const T* x = in + r * hidden;
  T* res = kAdd ? residual + r * hidden : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(x[i]);
    if (kAdd) {
      const T sum = from_float<T>(to_float(res[i]) + v);
      res[i] = sum;
      v = to_float(sum);
    }
    ss += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(ss, shared) / static_cast<float>(hidden) + eps);
  const T* src = kAdd ? res : x;  // each thread re-reads only the elements it wrote itself
  T* o = out + r * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    o[i] = from_float<T>(to_float(src[i]) * inv_rms * to_float(w[i]));
  }
}

template <typename T>
__global__ void silu_and_mul_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t inter) {
  const int64_t total = rows * inter;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / inter, i = e % inter;
    const float g = to_float(in[r * 2 * inter + i]);
    const float u = to_float(in[r * 2 * inter + inter + i]);
    out[e] = from_float<T>(g / (1.0f + expf(-g)) * u);
  }
}

template <bool kAdd>
cudaError_t launch_norm(DType t, DType wt, const void* in, void* residual, const void* w, void* out, int64_t rows,
                        int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(t, [&](auto t_tag) {
    using T = decltype(t_tag);
    return dispatch_dtype(wt, [&](auto w_tag) {
      using W = decltype(w_tag);
      rms_norm_kernel<T, W, kAdd><<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(
          static_cast<const T*>(in), static_cast<T*>(residual), static_cast<const W*>(w), static_cast<T*>(out),
          hidden, eps);
      return launch_status();
    });
  });
}

}  // namespace

cudaError_t rms_norm(DType t, DType wt, const void* in, const void* w, void* out, int64_t rows, int64_t hidden,
                     float eps, cudaStream_t stream) {
  return launch_norm<false>(t, wt, in, nullptr, w, out, rows, hidden, eps, stream);
}

cudaError_t fused_add_rms_norm(DType t, DType wt, const void* in, void* residual, const void* w, void* out,
                               int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  return launch_norm<true>(t, wt, in, residual, w, out, rows, hidden, eps, stream);
}

cudaError_t silu_and_mul(DType t, const void* in, void* out, int64_t rows, int64_t inter, cudaStream_t stream) {
  const int64_t total = rows * inter;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = ceil_div_blocks(total, threads);
  return dispatch_dtype(t, [&](auto t_tag) {
    using T = decltype(t_tag);
    silu_and_mul_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(static_cast<const T*>(in),
                                                                                 static_cast<T*>(out), rows, inter);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace layerskip
