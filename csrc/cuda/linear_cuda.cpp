// Torch glue of the CUDA linear: out [T, N] = input [T, K] @ weight [N, K]^T in the dtype of input (float32 on the
// CPU). T <= 64 runs the skinny kernel of linear.cu (each weight row read once for all rows; batch invariant: a
// row's reduction order does not depend on T); larger T (prefill) goes to cuBLAS through at::mm_out, with the
// weight converted to the input's dtype when they differ.
#include <ATen/ops/mm.h>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

void linear_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  const char* op = "linear";
  check_cuda(input, op, "input");
  check_same_device(weight, input, op, "weight");
  TORCH_CHECK(input.dim() == 2, "linear: input must be 2-D [T, K], got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be 2-D [N, K], got shape ", weight.sizes());
  check_float(input, op, "input");
  check_float(weight, op, "weight");
  TORCH_CHECK(input.size(1) == weight.size(1), "linear: input [T, K] and weight [N, K] disagree on K: input ",
              input.sizes(), ", weight ", weight.sizes());
  const int64_t tokens = input.size(0), n = weight.size(0), k = input.size(1);
  check_out(out, input, {tokens, n}, input.scalar_type(), op, "out");
  const c10::cuda::CUDAGuard guard(input.device());
  if (out.numel() == 0) return;
  if (tokens > kSkinnyMaxRows || k == 0) {
    const auto w = weight.scalar_type() == input.scalar_type() ? weight : weight.to(input.scalar_type());
    at::mm_out(out, input, w.t());
    return;
  }
  const auto x = input.stride(1) == 1 ? input : input.contiguous();
  const auto w = weight.contiguous();
  check_launch(linear_skinny(dtype_of(x), dtype_of(w), x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), tokens,
                             n, k, current_stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) { m.impl("linear", &linear_cuda); }

}  // namespace cuda
}  // namespace layerskip
