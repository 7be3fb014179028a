// CPU kernel of silu_and_mul, the SwiGLU gate of the Llama MLP: input [..., 2I] = gate | up ->
// silu(gate) * up [..., I]. float32 or bfloat16; math in float32 with a vectorisable exp.
#include "cpu/parallel.h"

#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "ops.h"

namespace layerskip {
namespace {

template <typename T>
void silu_and_mul_kernel(const T* in, T* out, int64_t rows, int64_t inter) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(inter, 1));
  cpu::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * 2 * inter;
      const T* up = gate + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = cpu::to_float(gate[i]);
        o[i] = cpu::from_float<T>(g / (1.0f + cpu::exp_fast(-g)) * cpu::to_float(up[i]));
      }
    }
  });
}

}  // namespace

void silu_and_mul_cpu(torch::Tensor& out, const torch::Tensor& input) {
  const char* op = "silu_and_mul";
  cpu::check_cpu(input, op, "input");
  cpu::check_float(input, true, op, "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  TORCH_CHECK(input.size(-1) % 2 == 0, op, ": the last dimension of input (gate | up) must be even, got ",
              input.sizes());
  const auto x = input.contiguous();
  const int64_t inter = x.size(-1) / 2;
  auto out_shape = x.sizes().vec();
  out_shape.back() = inter;
  cpu::check_out(out, out_shape, x.scalar_type(), op, "out");
  if (out.numel() == 0) return;
  const int64_t rows = out.numel() / inter;
  cpu::dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = cpu::elem_t<decltype(tag)>;
    silu_and_mul_kernel(x.data_ptr<T>(), out.data_ptr<T>(), rows, inter);
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("silu_and_mul", &silu_and_mul_cpu); }

}  // namespace layerskip
