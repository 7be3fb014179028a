// Torch side of the CUDA ops (included by csrc/cuda/*_cuda.cpp only): argument checks with the CPU ops'
// messages, the element type of a tensor as a launcher DType, and the check of a launcher's result.
#pragma once
// Light ATen headers instead of torch/all.h: each glue file compiles in seconds rather than a minute.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"

namespace layerskip {
namespace cuda {

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// t lives on the device of `like` (the op's first tensor argument).
inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// float32, float16 or bfloat16
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_float32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

inline void check_long(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_last_dim_dense(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

// out: a CUDA tensor on `like`'s device with the given shape and dtype, contiguous (destination passing).
inline void check_out(const at::Tensor& out, const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype,
                      const char* op, const char* name) {
  check_same_device(out, like, op, name);
  TORCH_CHECK(out.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous");
}

// t: a vector [n] of dtype on `like`'s device.
inline void check_vector(const at::Tensor& t, const at::Tensor& like, int64_t n, at::ScalarType dtype, const char* op,
                         const char* name) {
  check_same_device(t, like, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, "layerskip CUDA ops: unsupported dtype ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace layerskip
