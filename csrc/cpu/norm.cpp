// CPU kernels of rms_norm and fused_add_rms_norm (Llama RMSNorm), float32 or bfloat16 activations
// with a float32 or same-dtype weight. Statistics and products in float32; rows split across threads.
#include "cpu/parallel.h"

#include <cmath>
#include <vector>

#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "ops.h"

namespace layerskip {
namespace {

// Rows per parallel task: enough elements (~32k) that a task outweighs the threading overhead.
int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)); }

// out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i]; x is a float row of length H.
template <typename T, typename W>
inline void normalise_row(const float* x, const W* w, T* out, int64_t hidden, float eps) {
  const float inv_rms = 1.0f / std::sqrt(cpu::sum_of_squares(x, hidden) / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) out[i] = cpu::from_float<T>(x[i] * inv_rms * cpu::to_float(w[i]));
}

template <typename T, typename W>
void rms_norm_kernel(const T* in, const W* w, T* out, int64_t rows, int64_t hidden, float eps) {
  cpu::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);  // [H] the input row in float
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) row[i] = cpu::to_float(x[i]);
      normalise_row(row.data(), w, out + r * hidden, hidden, eps);
    }
  });
}

// residual += input, rounded to T (as an out-of-place add would be), then normalised into out.
template <typename T, typename W>
void fused_add_rms_norm_kernel(const T* in, T* residual, const W* w, T* out, int64_t rows, int64_t hidden,
                               float eps) {
  cpu::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);  // [H] the updated residual row in float
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * hidden;
      T* res = residual + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        res[i] = cpu::from_float<T>(cpu::to_float(res[i]) + cpu::to_float(x[i]));
        row[i] = cpu::to_float(res[i]);
      }
      normalise_row(row.data(), w, out + r * hidden, hidden, eps);
    }
  });
}

// Shared checks; returns H.
int64_t check_norm_args(const char* op, const torch::Tensor& input, const torch::Tensor& weight, double eps) {
  cpu::check_cpu(input, op, "input");
  cpu::check_cpu(weight, op, "weight");
  cpu::check_float(input, true, op, "input");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == input.scalar_type(), op,
              ": weight must be float32 or the dtype of input (", input.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  cpu::check_dim(weight, 1, op, "weight");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(weight.size(0) == hidden, op, ": weight must have shape [", hidden, "] (the last dimension of input ",
              input.sizes(), "), got ", weight.sizes());
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  return hidden;
}

}  // namespace

void rms_norm_cpu(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  const int64_t hidden = check_norm_args(op, input, weight, eps);
  cpu::check_out(out, input.sizes(), input.scalar_type(), op, "out");
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  if (x.numel() == 0) return;
  const int64_t rows = x.numel() / hidden;
  cpu::dispatch_float_pair(x.scalar_type(), w.scalar_type(), [&](auto* t_tag, const auto* w_tag) {
    using T = cpu::elem_t<decltype(t_tag)>;
    using W = cpu::elem_t<decltype(w_tag)>;
    rms_norm_kernel<T, W>(x.data_ptr<T>(), w.data_ptr<W>(), out.data_ptr<T>(), rows, hidden,
                          static_cast<float>(eps));
  });
}

void fused_add_rms_norm_cpu(torch::Tensor& out, const torch::Tensor& input, torch::Tensor& residual,
                            const torch::Tensor& weight, double eps) {
  const char* op = "fused_add_rms_norm";
  const int64_t hidden = check_norm_args(op, input, weight, eps);
  cpu::check_cpu(residual, op, "residual");
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual must have the shape of input ", input.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), op, ": residual must have the dtype of input (",
              input.scalar_type(), "), got ", residual.scalar_type());
  cpu::check_contiguous(residual, op, "residual (updated in place)");
  cpu::check_out(out, input.sizes(), input.scalar_type(), op, "out");
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  if (x.numel() == 0) return;
  const int64_t rows = x.numel() / hidden;
  cpu::dispatch_float_pair(x.scalar_type(), w.scalar_type(), [&](auto* t_tag, const auto* w_tag) {
    using T = cpu::elem_t<decltype(t_tag)>;
    using W = cpu::elem_t<decltype(w_tag)>;
    fused_add_rms_norm_kernel<T, W>(x.data_ptr<T>(), residual.data_ptr<T>(), w.data_ptr<W>(), out.data_ptr<T>(),
                                    rows, hidden, static_cast<float>(eps));
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}

}  // namespace layerskip
