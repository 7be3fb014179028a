// Row-level helpers of the sampling kernels (sampling.cpp, speculative.cpp): argmax and inverse-CDF
// sampling of one categorical row, identical to the Python references in ops.py.
#pragma once
#include <torch/all.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/reductions.h"

namespace layerskip {
namespace cpu {

// Index of the first maximum of x [n] (n >= 1); NaN entries are not supported.
inline int64_t argmax(const float* x, int64_t n) {
  const float best = max_value(x, n);
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == best) return i;
  }
  return 0;  // all entries NaN
}

// Throws unless the logits row z [n] holds no NaN and no +inf and has a finite maximum (-inf entries are
// masked tokens and allowed): a broken model's output is an error, never a garbage token. One vectorised
// pass: the sum is NaN when an entry is NaN, +inf when one is +inf.
inline void check_logits_row(const float* z, int64_t n, const char* op, int64_t row) {
  const float total = sum(z, n);
  const float best = max_value(z, n);
  TORCH_CHECK(!std::isnan(total) && total != std::numeric_limits<float>::infinity() && std::isfinite(best), op,
              ": logits row ", row, " must have a finite maximum and no NaN or +inf entries (entries finite or -inf); ",
              "a model producing non-finite logits has broken weights or inputs");
}

// Total mass of p [n] summed in float64 left to right (the order torch.cumsum uses), after checking
// that every entry is finite and >= 0. Throws naming op, name and row otherwise.
inline double row_mass(const float* p, int64_t n, const char* op, const char* name, int64_t row) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0.0f && std::isfinite(p[i]), op, ": ", name, "[", row, ", ", i,
                "] must be finite and >= 0, got ", p[i]);
    total += p[i];
  }
  return total;
}

// The first index i whose float64 running sum of p [n] exceeds target; the last index with
// positive mass when rounding leaves target at or above the total (target = u * total, u < 1).
inline int64_t invert_cdf(const float* p, int64_t n, double target) {
  double cum = 0.0;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += p[i];
    if (p[i] > 0.0f) last_positive = i;
    if (cum > target) return i;
  }
  return last_positive;
}

}  // namespace cpu
}  // namespace layerskip
