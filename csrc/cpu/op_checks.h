// Entry-point argument checks shared by the CPU kernels: each failure is a RuntimeError whose
// message names the op and the argument.
#pragma once
#include <torch/all.h>

namespace layerskip {
namespace cpu {

inline void check_cpu(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_dim(const torch::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// float32, or bfloat16 when allow_bf16
inline void check_float(const torch::Tensor& t, bool allow_bf16, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || (allow_bf16 && s == at::kBFloat16), op, ": ", name, " must be float32",
              allow_bf16 ? " or bfloat16" : "", ", got ", s);
}

inline void check_long(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

inline void check_contiguous(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The last dimension is dense (stride 1); the others may be strided (views of a fused projection).
inline void check_last_dim_dense(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

}  // namespace cpu
}  // namespace layerskip
