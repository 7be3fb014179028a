// Torch glue of the CUDA rms_norm, fused_add_rms_norm and silu_and_mul (kernels in norm_act.cu): the CPU ops'
// checks, device guard, current stream, registration for the CUDA dispatch key. Destination passing: the
// caller's `out` is written.
#include <cmath>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

int64_t check_norm_args(const char* op, const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                        double eps) {
  check_cuda(input, op, "input");
  check_same_device(weight, input, op, "weight");
  check_float(input, op, "input");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == input.scalar_type(), op,
              ": weight must be float32 or the dtype of input (", input.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  check_dim(weight, 1, op, "weight");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(weight.size(0) == hidden, op, ": weight must have shape [", hidden, "] (the last dimension of input ",
              input.sizes(), "), got ", weight.sizes());
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  check_out(out, input, input.sizes(), input.scalar_type(), op, "out");
  return hidden;
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  const int64_t hidden = check_norm_args(op, out, input, weight, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return;
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  check_launch(rms_norm(dtype_of(x), dtype_of(w), x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() / hidden,
                        hidden, static_cast<float>(eps), current_stream()),
               op);
}

void fused_add_rms_norm_cuda(at::Tensor& out, const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  const char* op = "fused_add_rms_norm";
  const int64_t hidden = check_norm_args(op, out, input, weight, eps);
  check_same_device(residual, input, op, "residual");
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual must have the shape of input ", input.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), op, ": residual must have the dtype of input (",
              input.scalar_type(), "), got ", residual.scalar_type());
  check_contiguous(residual, op, "residual (updated in place)");
  const c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return;
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  check_launch(fused_add_rms_norm(dtype_of(x), dtype_of(w), x.data_ptr(), residual.data_ptr(), w.data_ptr(),
                                  out.data_ptr(), x.numel() / hidden, hidden, static_cast<float>(eps),
                                  current_stream()),
               op);
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  const char* op = "silu_and_mul";
  check_cuda(input, op, "input");
  check_float(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  TORCH_CHECK(input.size(-1) % 2 == 0, op, ": the last dimension of input (gate | up) must be even, got ",
              input.sizes());
  const int64_t inter = input.size(-1) / 2;
  auto out_shape = input.sizes().vec();
  out_shape.back() = inter;
  check_out(out, input, out_shape, input.scalar_type(), op, "out");
  const c10::cuda::CUDAGuard guard(input.device());
  if (out.numel() == 0) return;
  const auto x = input.contiguous();
  check_launch(silu_and_mul(dtype_of(x), x.data_ptr(), out.data_ptr(), out.numel() / inter, inter, current_stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
}

}  // namespace cuda
}  // namespace layerskip
