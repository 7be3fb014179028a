// ctest: layerskip::linear called through the dispatcher (as the C++ engine does) against at::matmul in
// double precision, over token counts on both sides of the skinny-kernel limit (64), odd K (vector tail), N not
// a multiple of the row block, fp32 and bf16 weights; batch invariance (each row of a skinny call equals that row
// alone, bit for bit); plus the error checks. With bf16 weights on the avx512bf16 kernel the reference rounds
// the input to bf16 as the kernel does. Exit code 0 = pass.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

namespace {

using LinearFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<LinearFn>& linear_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("layerskip::linear", "").typed<LinearFn>();
  return op;
}

int failures = 0;

at::Tensor run_linear(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor out = torch::empty({x.dim() == 2 ? x.size(0) : 0, w.dim() == 2 ? w.size(0) : 0});  // [T, N]
  linear_op().call(out, x, w);
  return out;
}

// The avx512bf16 kernel (the default on CPUs with AVX512_BF16) rounds the input to bf16 for bf16 weights.
bool rounds_bf16_inputs() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layerskip::linear_kernel", "")
                             .typed<std::string()>();
  return op.call() == "avx512bf16";
}

void check_case(int64_t T, int64_t K, int64_t N, at::ScalarType wtype) {
  at::Tensor x = torch::randn({T, K});                  // [T, K]
  at::Tensor w = torch::randn({N, K}).to(wtype);        // [N, K]
  at::Tensor out = run_linear(x, w);                      // [T, N]
  const at::Tensor xr = wtype == at::kBFloat16 && rounds_bf16_inputs() ? x.to(at::kBFloat16) : x;
  at::Tensor ref = at::matmul(xr.to(at::kDouble), w.to(at::kDouble).t());  // [T, N]
  const bool shape_ok = out.sizes() == ref.sizes() && out.scalar_type() == at::kFloat;
  // fp32 accumulation over K terms of size ~1: error grows like sqrt(K) * eps * |terms|
  const bool close = shape_ok && at::allclose(out.to(at::kDouble), ref, /*rtol=*/1e-4, /*atol=*/1e-4 * K);
  if (!close) {
    ++failures;
    std::printf("FAIL T=%lld K=%lld N=%lld %s: shape %s, max abs err %g\n", static_cast<long long>(T),
                static_cast<long long>(K), static_cast<long long>(N), c10::toString(wtype),
                shape_ok ? "ok" : "wrong",
                shape_ok ? (out.to(at::kDouble) - ref).abs().max().item<double>() : -1.0);
  }
}

// The op must throw (a c10::Error, i.e. a TORCH_CHECK) with a message containing `expected`.
void check_error(const char* what, const at::Tensor& x, const at::Tensor& w, const std::string& expected) {
  try {
    run_linear(x, w);
    ++failures;
    std::printf("FAIL %s: no error raised\n", what);
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find(expected) == std::string::npos) {
      ++failures;
      std::printf("FAIL %s: message lacks '%s': %s\n", what, expected.c_str(), e.what_without_backtrace());
    }
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  int cases = 0;
  for (at::ScalarType wtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t T : {1, 2, 3, 5, 8, 13, 16, 17, 40, 64, 65, 100}) {
      for (int64_t K : {7, 64, 576, 1000}) {
        for (int64_t N : {1, 5, 192, 577}) {
          check_case(T, K, N, wtype);
          ++cases;
        }
      }
    }
  }
  // batch invariance: rows of a skinny call (T <= 64) equal the rows computed alone, bit for bit
  for (at::ScalarType wtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor x = torch::randn({64, 576}), w = torch::randn({300, 576}).to(wtype);
    at::Tensor all = run_linear(x, w);
    for (int64_t t : {0, 7, 33, 63}) {
      if (!at::equal(all.narrow(0, t, 1), run_linear(x.narrow(0, t, 1), w)) ||
          !at::equal(all.narrow(0, t, 1), run_linear(x.narrow(0, t / 2, 64 - t / 2), w).narrow(0, t - t / 2, 1))) {
        ++failures;
        std::printf("FAIL batch invariance row %lld %s\n", static_cast<long long>(t), c10::toString(wtype));
      }
    }
    ++cases;
  }
  check_error("1-D input", torch::randn({8}), torch::randn({4, 8}), "input [T, K] must have 2 dimensions");
  check_error("3-D weight", torch::randn({2, 8}), torch::randn({4, 8, 1}), "weight [N, K] must have 2 dimensions");
  check_error("double input", torch::randn({2, 8}, at::kDouble), torch::randn({4, 8}), "input must be float32");
  check_error("int8 weight", torch::randn({2, 8}), torch::randn({4, 8}).to(at::kChar), "weight must be float32, bfloat16 or float16");
  check_error("K mismatch", torch::randn({2, 8}), torch::randn({4, 9}), "disagree on K");

  std::printf("%d cases + 5 error checks, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
