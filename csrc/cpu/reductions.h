// Small loops shared by the CPU kernels (norm, attention, sampling), written so that GCC/Clang
// vectorise them at -O3 -march=native without -ffast-math: reductions keep kLanes independent
// partial sums (explicit reassociation), element-wise loops are plain.
// Element types: float, or c10::BFloat16 widened to float on load.
#pragma once
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace layerskip {
namespace cpu {

constexpr int64_t kLanes = 16;  // partial sums per reduction: one AVX-512 register or two AVX2 registers

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// sum_i a[i] * b[i]
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += to_float(a[i + j]) * to_float(b[i + j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  for (; i < n; ++i) total += to_float(a[i]) * to_float(b[i]);
  return total;
}

// sum_i x[i]^2
template <typename T>
inline float sum_of_squares(const T* x, int64_t n) {
  return dot(x, x, n);
}

// y[i] += alpha * x[i]
template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

// max_i x[i]
inline float max_value(const float* x, int64_t n) {
  float acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
  }
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < kLanes; ++j) best = best > acc[j] ? best : acc[j];
  for (; i < n; ++i) best = best > x[i] ? best : x[i];
  return best;
}

// sum_i x[i]
inline float sum(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  }
  float total = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  for (; i < n; ++i) total += x[i];
  return total;
}

// exp(x) for float, branch-free so that loops calling it vectorise: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes expf coefficients), 2^n from
// the exponent bits. Relative error about 2e-7 on [-87, 88]; below -87 it returns 0 (also for -inf), NaN
// stays NaN. The clamps are written so that NaN fails both comparisons and becomes -87: the float-to-int
// conversion below never sees NaN (undefined behaviour). (No std::floor / fmin: GCC 12 does not vectorise
// loops calling them without -ffast-math.)
inline float exp_fast(float x) {
  float xc = x > -87.0f ? x : -87.0f;
  xc = xc < 88.0f ? xc : 88.0f;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rint via 1.5 * 2^23
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = x < -87.0f ? 0.0f : p * scale;
  return x == x ? e : x;  // NaN in, NaN out
}

}  // namespace cpu
}  // namespace layerskip
