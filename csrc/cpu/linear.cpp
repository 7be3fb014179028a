// layerskip::linear on the CPU: out [T, N] = input [T, K] @ weight [N, K]^T, weight float32, bfloat16 or float16.
//
// Decoding is memory bound: a decode step (T = 1 per row), a verify block (d + 1 per row) or a batch of them
// (T <= 64) reads every weight once and does only T multiply-adds per weight element. ATen's skinny GEMM costs
// more per call as T grows and its bf16 path runs at about half the bytes per second of its fp32 one, so for
// T <= kLinearSkinnyMaxTokens (64) we run our own kernel (linear_kernel_simd.inc): output rows N are split
// across threads; each thread takes its weight rows a few at a time and multiplies every such block against
// all T input rows (passes of a few rows, the later ones reading the block, widened to float32 once, from L1),
// so each weight byte comes from memory once whatever T is. 16-bit weights are widened exactly to float32 in
// registers; activations and accumulation stay float32 -- except in the avx512bf16 kernel (the default where the
// CPU has AVX512_BF16, e.g. Zen 4), which for bfloat16 weights rounds the input rows to bfloat16 and multiplies
// in vdpbf16ps dot products (exact products, float32 sums), like PyTorch's bf16 matmuls and llama.cpp's BF16
// type: twice the multiply-adds per instruction, so that a batch of 8 rows is no longer compute bound. It does
// so at every T, prefill included, so a row's numerics never depend on the batch (accuracy on SmolLM2:
// benchmarks/results_bf16dot.md). LAYERSKIP_LINEAR_KERNEL=avx512 keeps float32 activations.
// Batch invariance: every output element is one dot product in a fixed order (linear_kernels.h) whatever T
// is, whichever pass a row falls in and however threads split N, so a row's result does not depend on the
// other rows of the call. Larger T (prefill) goes to at::mm, whose order depends on T; 16-bit weights are
// then widened in blocks of rows, never the whole matrix at once (bf16 weights with avx512bf16: the kernel,
// 64 rows at a time).
//
// The kernel is chosen at run time from cpuid: avx512bf16 > avx512 > avx2 > plain. The environment variable
// LAYERSKIP_LINEAR_KERNEL (read once) or layerskip::set_linear_kernel forces one the CPU supports, so tests
// run every path the machine has. Switching kernels changes the low bits of results: do it between
// generations, not during one.
#include "cpu/kernel_choice.h"
#include "cpu/parallel.h"
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/linear_kernels.h"
#include "cpu/op_checks.h"
#include "ops.h"

namespace layerskip {

namespace {

// Best first. __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
std::vector<cpu::KernelChoice<linear_kernels::RowsKernel>> all_kernels() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  const bool avx512bf16 = avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return {{"avx512bf16", &linear_kernels::rows_avx512bf16, avx512bf16},
          {"avx512", &linear_kernels::rows_avx512, avx512},
          {"avx2", &linear_kernels::rows_avx2, avx2},
          {"plain", &linear_kernels::rows_plain, true}};
}

cpu::KernelSelector<linear_kernels::RowsKernel>& selector() {
  static cpu::KernelSelector<linear_kernels::RowsKernel> s("linear", "LAYERSKIP_LINEAR_KERNEL", all_kernels());
  return s;
}

// Threads split N into contiguous blocks of at least 256 KiB of weights x input rows (a guess, not tuned:
// waking a second thread costs microseconds, reading 256 KiB about 15; with T rows a block of 256 / T KiB takes
// about as long once the multiply-adds dominate, so a batch splits weights that batch 1 keeps on one thread).
// The split never changes a result: each output element is computed whole by one thread.
void skinny_linear(linear_kernels::RowsKernel fn, int wtype, int64_t elem_bytes, const void* w, const float* x,
                   int64_t T, int64_t K, float* out, int64_t N) {
  const int64_t work_per_row = std::max<int64_t>(K * elem_bytes * T, 1);
  const int64_t grain = std::max<int64_t>((int64_t{256} << 10) / work_per_row, 8);
  cpu::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(wtype, w, K, n0, n1, x, T, out, N); });
}

// Prefill (T > kLinearSkinnyMaxTokens): out = x @ w.T by at::mm, 16-bit weights widened 1024 rows at a time.
void gemm_linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w) {
  if (w.scalar_type() == at::kFloat) {
    at::mm_out(out, x, w.t());
    return;
  }
  constexpr int64_t kBlock = 1024;  // weight rows widened per GEMM call: 1024 x K floats
  const int64_t N = w.size(0);
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    const int64_t n = std::min(kBlock, N - n0);
    out.narrow(1, n0, n).copy_(at::mm(x, w.narrow(0, n0, n).to(at::kFloat).t()));  // [T, n]
  }
}

}  // namespace

// out [T, N] float32 = input [T, K] float32 @ weight [N, K] float32 | bfloat16 | float16 .T
void linear_cpu(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& weight) {
  const char* op = "linear";
  cpu::check_cpu(input, op, "input");
  cpu::check_cpu(weight, op, "weight");
  cpu::check_dim(input, 2, op, "input [T, K]");
  cpu::check_dim(weight, 2, op, "weight [N, K]");
  cpu::check_float(input, false, op, "input");
  const at::ScalarType wdtype = weight.scalar_type();
  TORCH_CHECK(wdtype == at::kFloat || wdtype == at::kBFloat16 || wdtype == at::kHalf, op,
              ": weight must be float32, bfloat16 or float16, got ", wdtype);
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input [T, K] and weight [N, K] disagree on K: input ",
              input.sizes(), ", weight ", weight.sizes());
  const int64_t T = input.size(0), K = input.size(1), N = weight.size(0);
  cpu::check_out(out, {T, N}, at::kFloat, op, "out [T, N]");

  const torch::Tensor x = input.contiguous();   // [T, K]
  const torch::Tensor w = weight.contiguous();  // [N, K]
  if (T == 0 || N == 0) return;
  // the kernels take raw element patterns: float, or the 16 bits of a bfloat16 / IEEE half
  const int wtype = wdtype == at::kFloat ? linear_kernels::kF32
                    : wdtype == at::kBFloat16 ? linear_kernels::kBF16
                                              : linear_kernels::kF16;
  const linear_kernels::RowsKernel fn = selector().current()->fn;
  if (T > kLinearSkinnyMaxTokens && wtype == linear_kernels::kBF16 && linear_kernels::rounds_bf16_inputs(fn)) {
    // prefill with a kernel that rounds the inputs to bf16: the same numerics as decoding, 64 rows at a time
    for (int64_t t0 = 0; t0 < T; t0 += kLinearSkinnyMaxTokens) {
      const int64_t rows = std::min(kLinearSkinnyMaxTokens, T - t0);
      skinny_linear(fn, wtype, w.element_size(), w.data_ptr(), x.data_ptr<float>() + t0 * K, rows, K,
                    out.data_ptr<float>() + t0 * N, N);
    }
    return;
  }
  if (T > kLinearSkinnyMaxTokens) {  // prefill: ATen's GEMM (MKL) is good at many rows
    gemm_linear(out, x, w);
    return;
  }
  skinny_linear(fn, wtype, w.element_size(), w.data_ptr(), x.data_ptr<float>(), T, K, out.data_ptr<float>(), N);
}

std::vector<std::string> linear_kernels_cpu() { return selector().supported_names(); }

std::string linear_kernel_cpu() { return selector().current()->name; }

void set_linear_kernel_cpu(const std::string& name) { selector().set(name); }

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("linear", &linear_cpu); }

// No tensor arguments: these dispatch to their CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(layerskip, CompositeImplicitAutograd, m) {
  m.impl("linear_kernels", &linear_kernels_cpu);
  m.impl("linear_kernel", &linear_kernel_cpu);
  m.impl("set_linear_kernel", &set_linear_kernel_cpu);
}

}  // namespace layerskip
