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

// A caller-owned output: on the CPU, contiguous, with the expected shape and dtype.
inline void check_out(const torch::Tensor& out, at::IntArrayRef sizes, at::ScalarType dtype, const char* op,
                      const char* name) {
  TORCH_CHECK(out.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A per-token (or per-row) parameter: a 1-D CPU tensor of n elements of the given dtype.
inline void check_vector(const torch::Tensor& t, int64_t n, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Every entry of an int64 vector in [0, bound), compared without arithmetic (cannot overflow).
inline void check_indices(const torch::Tensor& t, int64_t bound, const char* op, const char* name,
                          const char* bound_name) {
  const auto c = t.contiguous();
  const int64_t* x = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(x[i] >= 0 && x[i] < bound, op, ": ", name, "[", i, "] = ", x[i], " is outside [0, ", bound, ") (",
                bound_name, ")");
  }
}

}  // namespace cpu
}  // namespace layerskip
