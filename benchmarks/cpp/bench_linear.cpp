// Microbenchmark of layerskip::linear (through the dispatcher) vs at::linear on SmolLM2-135M shapes, without
// Python in the loop. Weights are cold: each call takes the next of enough copies to exceed the caches, and
// ours and ATen read different copies. They alternate call by call so that load from other processes hits
// both alike.
//
//   build/cmake/bench_linear [working_set_MB=512] [calls_per_cell=200]
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using LinearFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&);

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  const int64_t ws_mb = argc > 1 ? std::atoll(argv[1]) : 512;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 200;
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layerskip::linear", "").typed<LinearFn>();
  struct Shape {
    const char* name;
    int64_t k, n;
  };
  const Shape shapes[] = {{"q/o_proj 576->576", 576, 576},
                          {"k/v_proj 576->192", 576, 192},
                          {"gate|up 576->3072", 576, 3072},
                          {"down 1536->576", 1536, 576},
                          {"lm_head 576->49152", 576, 49152}};
  std::printf("threads %d, weight working set %lld MB, %d calls per cell, medians\n", at::get_num_threads(),
              static_cast<long long>(ws_mb), reps);
  std::printf("%-20s %-5s %3s | %8s %6s | %8s %6s | %7s\n", "shape", "dtype", "T", "ours us", "GB/s", "aten us",
              "GB/s", "speedup");
  torch::manual_seed(0);
  for (const Shape& s : shapes) {
    for (at::ScalarType wtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor w = (torch::randn({s.n, s.k}) / std::sqrt(static_cast<double>(s.k))).to(wtype);  // [N, K]
      const double nbytes = static_cast<double>(w.numel() * w.element_size());
      std::vector<at::Tensor> copies;
      for (int64_t i = 0; i < std::max<int64_t>(1, ws_mb * (1 << 20) / static_cast<int64_t>(nbytes)); ++i)
        copies.push_back(w.clone());
      for (int64_t T : {1, 2, 4, 8, 16, 32, 64}) {
        const at::Tensor x = torch::randn({T, s.k});  // [T, K]
        at::Tensor out = torch::empty({T, s.n});       // [T, N]
        auto aten = [&](const at::Tensor& wi) {
          return wtype == at::kFloat ? at::linear(x, wi) : at::linear(x.to(wtype), wi).to(at::kFloat);
        };
        for (const at::Tensor& wi : copies) {  // warm-up pass
          op.call(out, x, wi);
          aten(wi);
        }
        std::vector<double> t_ours, t_aten;
        for (int i = 0; i < reps; ++i) {
          const at::Tensor& wi = copies[i % copies.size()];
          const at::Tensor& wa = copies[(i + copies.size() / 2) % copies.size()];  // not the copy ours just read
          double t0 = now();
          op.call(out, x, wi);
          double t1 = now();
          aten(wa);
          double t2 = now();
          t_ours.push_back(t1 - t0);
          t_aten.push_back(t2 - t1);
        }
        const double mo = median(t_ours), ma = median(t_aten);
        std::printf("%-20s %-5s %3lld | %8.1f %6.1f | %8.1f %6.1f | %6.2fx\n", s.name,
                    wtype == at::kFloat ? "fp32" : "bf16", static_cast<long long>(T), mo * 1e6, nbytes / mo / 1e9,
                    ma * 1e6, nbytes / ma / 1e9, ma / mo);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
