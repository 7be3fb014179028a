// layerskip::linear on the CPU: out [T, N] = input [T, K] @ weight [N, K]^T, weight float32 or bfloat16.
//
// Decoding is memory bound: a decode step (T = 1 per row), a verify block (d + 1 per row) or a batch of them
// (T <= 64) reads every weight once and does only T multiply-adds per weight element. ATen's skinny GEMM costs more per call as T grows (2-3x from
// T = 1 to T = 8 on the LM head) and its bf16 path runs at about half the bytes per second of its fp32 one,
// so for T <= kLinearSkinnyMaxTokens (64) we run our own kernel: output rows N are split across threads; each thread
// walks its weight rows kRows at a time, and every block of kRows weight rows is multiplied against all T
// input rows (in passes of at most kTokens tokens, the later passes finding the block in L1) before moving
// on, so each weight byte comes from memory once whatever T is. bfloat16 weights are widened to float32 in
// registers (a 16-bit shift), halving the bytes read; accumulation is float32 throughout.
// Batch invariance: every output element is one dot product in a fixed order (kWidth lanes over K, the lanes
// summed, then the K tail) whatever T is, whichever pass a row falls in and however threads split N, so a
// row's result does not depend on the other rows of the call. Larger T (prefill) goes to at::mm, whose order
// depends on T; bfloat16 weights are then widened in blocks of rows, never the whole matrix at once.
#include "cpu/parallel.h"
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "ops.h"

namespace layerskip {
namespace {


// ---------------------------------------------------------------------------------------------------
// SIMD flavours. Each gives: Vec, kWidth floats per Vec, zero(), load(const float*), load(const BF16*)
// (widened to float), fma(a, b, c) = a * b + c, sum(Vec) (horizontal), and the register blocking of the
// kernel: kRows weight rows per block and at most kTokens input rows per pass (kRows * kTokens
// accumulators, kTokens input vectors and one weight vector must fit in the register file). Blockings
// measured on the dev machine (Xeon, AVX-512): 2 x 8 beat 4 x 6 and 4 x 4 by up to 15% at T = 16;
// with AVX2 only, 2 x 4 beat 4 x 3 and 3 x 3.

using BF16 = uint16_t;  // raw bfloat16 bits: the top half of a float32

inline float bf16_to_float(BF16 b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX512F__)
struct Simd {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 2;
  static constexpr int kTokens = 8;  // 16 accumulators + 8 inputs + 1 weight of 32 zmm registers
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const BF16* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Simd {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 2;
  static constexpr int kTokens = 4;  // 8 accumulators + 4 inputs + 1 weight of 16 ymm registers
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const BF16* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 4 lanes
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                         // 2 lanes
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                          // 1 lane
    return _mm_cvtss_f32(s);
  }
};
#else
struct Simd {  // portable scalar path: a "vector" of one float
  using Vec = float;
  static constexpr int kWidth = 1;
  static constexpr int kRows = 4;
  static constexpr int kTokens = 4;
  static Vec zero() { return 0.0f; }
  static Vec load(const float* p) { return *p; }
  static Vec load(const BF16* p) { return bf16_to_float(*p); }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static float sum(Vec v) { return v; }
};
#endif

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return bf16_to_float(v); }

// How far ahead (in bytes) of the current position each weight row is prefetched, into L2 (measured on
// the dev machine: 8 KiB into L2 beats 1 KiB into L1 by 5-15% for T >= 2, where the kernel also computes).
constexpr int64_t kPrefetchBytes = 8192;

// ---------------------------------------------------------------------------------------------------
// Micro-kernel: out[t, n] for R consecutive weight rows and TB input rows.
// x: TB input rows with stride K; w: R weight rows with stride K; out: column n of row 0, row stride N.
template <int R, int TB, typename W>
inline void dot_block(const float* x, const W* w, int64_t K, float* out, int64_t N) {
  using Vec = typename Simd::Vec;
  constexpr int kW = Simd::kWidth;
  Vec acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = Simd::zero();

  const int64_t k_vec = K - K % kW;
  for (int64_t k = 0; k < k_vec; k += kW) {
#if defined(__AVX2__) || defined(__AVX512F__)
    if ((k * static_cast<int64_t>(sizeof(W))) % 64 == 0) {  // one prefetch per cache line per row
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchBytes, _MM_HINT_T1);
    }
#endif
    Vec xv[TB];  // the inputs' chunk stays in registers for all R rows
    for (int t = 0; t < TB; ++t) xv[t] = Simd::load(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const Vec wv = Simd::load(w + r * K + k);
      for (int t = 0; t < TB; ++t) acc[r][t] = Simd::fma(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = Simd::sum(acc[r][t]);
      for (int64_t k = k_vec; k < K; ++k) s += to_float(w[r * K + k]) * x[t * K + k];  // K tail
      out[t * N + r] = s;
    }
  }
}

// n <= TB input rows against R weight rows (dispatch of the runtime n to the templates).
template <int R, int TB, typename W>
inline void dot_tokens(int64_t n, const float* x, const W* w, int64_t K, float* out, int64_t N) {
  if constexpr (TB > 0) {
    if (n == TB) {
      dot_block<R, TB>(x, w, K, out, N);
    } else {
      dot_tokens<R, TB - 1>(n, x, w, K, out, N);
    }
  }
}

// All T input rows against R weight rows, in passes of at most Simd::kTokens rows of equal size
// (T = 10 with kTokens = 8 runs 5 + 5, not 8 + 2: a small pass wastes the weight loads and widening).
template <int R, typename W>
inline void dot_rows(const float* x, int64_t T, const W* w, int64_t K, float* out, int64_t N) {
  const int64_t passes = (T + Simd::kTokens - 1) / Simd::kTokens;
  int64_t t = 0;
  for (int64_t p = passes; p > 0; --p) {
    const int64_t tb = (T - t + p - 1) / p;  // the remaining rows, spread evenly over the remaining passes
    dot_tokens<R, Simd::kTokens>(tb, x + t * K, w, K, out + t * N, N);
    t += tb;
  }
}

// Output columns [n0, n1) for all T rows: weight rows in blocks of Simd::kRows, then one at a time.
template <typename W>
void skinny_range(const float* x, int64_t T, const W* w, int64_t K, float* out, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + Simd::kRows <= n1; n += Simd::kRows) dot_rows<Simd::kRows>(x, T, w + n * K, K, out + n, N);
  for (; n < n1; ++n) dot_rows<1>(x, T, w + n * K, K, out + n, N);
}

template <typename W>
void skinny_linear(const float* x, int64_t T, const W* w, int64_t K, float* out, int64_t N) {
  // Threads split N into contiguous blocks of at least 256 KiB of weights (a guess, not tuned: waking a
  // second thread costs microseconds, reading 256 KiB about 15).
  const int64_t bytes_per_row = std::max<int64_t>(K * static_cast<int64_t>(sizeof(W)), 1);
  const int64_t grain = std::max<int64_t>((int64_t{256} << 10) / bytes_per_row, Simd::kRows);
  cpu::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { skinny_range(x, T, w, K, out, N, n0, n1); });
}

// Prefill (T > kLinearSkinnyMaxTokens): out = x @ w.T by at::mm, bfloat16 weights widened 1024 rows at a time.
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

// out [T, N] float32 = input [T, K] float32 @ weight [N, K] float32 | bfloat16 .T
void linear_cpu(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& weight) {
  const char* op = "linear";
  cpu::check_cpu(input, op, "input");
  cpu::check_cpu(weight, op, "weight");
  cpu::check_dim(input, 2, op, "input [T, K]");
  cpu::check_dim(weight, 2, op, "weight [N, K]");
  cpu::check_float(input, false, op, "input");
  cpu::check_float(weight, true, op, "weight");
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input [T, K] and weight [N, K] disagree on K: input ",
              input.sizes(), ", weight ", weight.sizes());
  const int64_t T = input.size(0), K = input.size(1), N = weight.size(0);
  cpu::check_out(out, {T, N}, at::kFloat, op, "out [T, N]");

  const torch::Tensor x = input.contiguous();   // [T, K]
  const torch::Tensor w = weight.contiguous();  // [N, K]
  if (T == 0 || N == 0) return;
  if (T > kLinearSkinnyMaxTokens) {  // prefill: ATen's GEMM (MKL) is good at many rows
    gemm_linear(out, x, w);
    return;
  }
  float* o = out.data_ptr<float>();
  cpu::dispatch_float(w.scalar_type(), [&](auto* tag) {
    using W = cpu::elem_t<decltype(tag)>;
    if constexpr (std::is_same_v<W, float>) {
      skinny_linear(x.data_ptr<float>(), T, w.data_ptr<float>(), K, o, N);
    } else {
      skinny_linear(x.data_ptr<float>(), T, reinterpret_cast<const BF16*>(w.data_ptr<W>()), K, o, N);
    }
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace layerskip
