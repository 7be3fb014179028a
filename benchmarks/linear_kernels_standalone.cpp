// Torch-free check and microbenchmark of layerskip::linear's kernels (csrc/cpu/linear_kernel_*.cpp): random
// fp32 / bf16 / fp16 weights and fp32 inputs; each kernel against a float64 reference (relative error), the
// batch invariance of each (every row of a T-row call bit for bit equal to the row alone), and the
// single-thread speed per T: GB/s of weights read and GFLOP/s (thread CPU time, so that a busy machine shows
// the kernel's own speed; the weights cycle through copies larger than the caches). It does not check
// cpuid: run it on an AVX-512 CPU.
//
//   g++ -O3 -march=x86-64-v2 -Icsrc benchmarks/linear_kernels_standalone.cpp csrc/cpu/linear_kernel_*.cpp -o lk
//   ./lk K N [reps] [kernels=plain,avx2,avx512] [tokens=1,2,4,8,16,32,64]
#include <time.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/linear_kernels.h"

using namespace layerskip::linear_kernels;

namespace {

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7fff + ((b >> 16) & 1);
  return static_cast<uint16_t>(b >> 16);
}

uint16_t to_f16(float f) {  // normal range only, truncating (enough for test data)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t s = (x >> 16) & 0x8000;
  const int e = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(s);
  return static_cast<uint16_t>(s | (e << 10) | ((x >> 13) & 0x3ff));
}

float widen(int wtype, const void* w, int64_t i) {
  if (wtype == kF32) return static_cast<const float*>(w)[i];
  const uint16_t v = static_cast<const uint16_t*>(w)[i];
  if (wtype == kBF16) {
    const uint32_t b = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  const int e = (v >> 10) & 0x1f, m = v & 0x3ff;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -24) : std::ldexp(1.0f + m / 1024.0f, e - 15);
  return (v & 0x8000) ? -mag : mag;
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s K N [reps] [kernels] [tokens]\n", argv[0]);
    return 2;
  }
  const int64_t K = std::atoll(argv[1]), N = std::atoll(argv[2]);
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  const std::string kernel_list = argc > 4 ? argv[4] : "plain,avx2,avx512";
  const std::vector<int> tokens = parse_list(argc > 5 ? argv[5] : "1,2,4,8,16,32,64");
  struct Named {
    const char* name;
    RowsKernel fn;
  } all[] = {{"plain", rows_plain}, {"avx2", rows_avx2}, {"avx512", rows_avx512}};
  const char* wnames[] = {"fp32", "bf16", "fp16"};
  const int64_t Tmax = 64;

  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  std::vector<float> base(N * K), x(Tmax * K);
  for (auto& v : base) v = nd(gen) / std::sqrt(static_cast<float>(K));
  for (auto& v : x) v = nd(gen);
  int failures = 0;
  for (int wtype = kF32; wtype <= kF16; ++wtype) {
    const size_t esize = wtype == kF32 ? 4 : 2;
    const size_t wbytes = N * K * esize;
    const int copies = static_cast<int>(std::max<size_t>(1, (size_t{256} << 20) / wbytes));  // 256 MB cycled
    std::vector<std::vector<uint8_t>> w(copies, std::vector<uint8_t>(wbytes));
    for (int64_t i = 0; i < N * K; ++i) {
      if (wtype == kF32) {
        std::memcpy(&w[0][i * 4], &base[i], 4);
      } else {
        const uint16_t h = wtype == kBF16 ? to_bf16(base[i]) : to_f16(base[i]);
        std::memcpy(&w[0][i * 2], &h, 2);
      }
    }
    for (int c = 1; c < copies; ++c) w[c] = w[0];
    std::vector<double> ref(Tmax * N);  // float64 reference of the widened weights
    for (int64_t t = 0; t < Tmax; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<double>(widen(wtype, w[0].data(), n * K + k)) * x[t * K + k];
        ref[t * N + n] = s;
      }
    for (const auto& kn : all) {
      if (kernel_list.find(kn.name) == std::string::npos) continue;
      // correctness and batch invariance: every T, each row against the same row computed alone
      std::vector<float> alone(Tmax * N), out(Tmax * N);
      for (int64_t t = 0; t < Tmax; ++t) kn.fn(wtype, w[0].data(), K, 0, N, &x[t * K], 1, &alone[t * N], N);
      double err = 0;
      for (int64_t i = 0; i < Tmax * N; ++i) err = std::max(err, std::fabs(alone[i] - ref[i]));
      int mismatches = 0;
      for (int64_t T = 1; T <= Tmax; ++T) {
        const int64_t t0 = (T * 7) % (Tmax - T + 1);  // a varying first row
        kn.fn(wtype, w[0].data(), K, 0, N, &x[t0 * K], T, out.data(), N);
        for (int64_t i = 0; i < T * N; ++i) mismatches += std::memcmp(&out[i], &alone[t0 * N + i], 4) != 0;
      }
      failures += mismatches != 0 || err > 1e-3;
      std::printf("%-6s %s K=%lld N=%lld: max abs err vs float64 %.2e, batch-invariance mismatches %d\n", kn.name,
                  wnames[wtype], static_cast<long long>(K), static_cast<long long>(N), err, mismatches);
      for (int T : tokens) {
        std::vector<double> times;
        for (int r = 0; r < reps + copies; ++r) {
          const double t0 = cpu_now();
          kn.fn(wtype, w[r % copies].data(), K, 0, N, x.data(), T, out.data(), N);
          if (r >= copies) times.push_back(cpu_now() - t0);  // the first pass over the copies is warm-up
        }
        std::sort(times.begin(), times.end());
        const double s = times[times.size() / 2];
        std::printf("  T=%2d  %8.1f us  %6.1f GB/s  %6.1f GFLOP/s\n", T, s * 1e6, wbytes / s / 1e9,
                    2.0 * T * N * K / s / 1e9);
      }
    }
  }
  return failures ? 1 : 0;
}
