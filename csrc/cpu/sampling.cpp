// CPU kernels of sampling_probs, sample_from_probs and sample: per-token temperature / top-k / top-p
// filtering and seeded inverse-CDF sampling with the counter-based generator of random.h. Every parameter is
// a per-token tensor ([T]), so one call serves rows with different settings; rows are independent.
//
// Filtering of a row (logits z [V], temperature T > 0; T == 0 gives the one-hot of the first argmax):
//   e_i = exp((z_i - max z) / T).
//   Order: tokens ranked by logit, descending, ties by lower index first (a strict total order, the
//   order of torch.sort(-z, stable=True)); it is also the order by probability.
//   top_k > 0 keeps the first min(top_k, V) tokens of that order.
//   top_p < 1 then keeps the shortest prefix (of the same order, among the top-k) whose summed e
//   (float64, left to right) reaches top_p * (summed e of the top-k); at least one token.
//   The kept e are renormalised to sum to 1; all others are 0.
#include "cpu/parallel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/categorical.h"
#include "cpu/dtype_dispatch.h"
#include "sampling_rules.h"
#include "cpu/op_checks.h"
#include "cpu/reductions.h"
#include "ops.h"
#include "random.h"

namespace layerskip {
namespace {

// Per-token parameters of T tokens: temperature [T] float64 (finite, >= 0), top_k [T] int64 (>= 0),
// top_p [T] float64 in (0, 1].
void check_filter_args(const char* op, int64_t tokens, const torch::Tensor& temperature, const torch::Tensor& top_k,
                       const torch::Tensor& top_p) {
  cpu::check_vector(temperature, tokens, at::kDouble, op, "temperature");
  cpu::check_vector(top_k, tokens, at::kLong, op, "top_k");
  cpu::check_vector(top_p, tokens, at::kDouble, op, "top_p");
  const auto t = temperature.contiguous(), p = top_p.contiguous();
  const auto k = top_k.contiguous();
  for (int64_t i = 0; i < tokens; ++i) {
    const double ti = t.data_ptr<double>()[i], pi = p.data_ptr<double>()[i];
    TORCH_CHECK(std::isfinite(ti) && ti >= 0.0, op, ": temperature[", i, "] must be finite and >= 0, got ", ti);
    TORCH_CHECK(temperature_in_range(ti), op, ": temperature must be 0 (greedy) or in [1e-4, 1e4], got ",
                ti, " (token ", i, ")");
    TORCH_CHECK(k.data_ptr<int64_t>()[i] >= 0, op, ": top_k[", i, "] must be >= 0 (0 disables it), got ",
                k.data_ptr<int64_t>()[i]);
    TORCH_CHECK(pi > 0.0 && pi <= 1.0, op, ": top_p[", i, "] must be in (0, 1] (1 disables it), got ", pi);
  }
}

void check_logits(const char* op, const torch::Tensor& logits) {
  cpu::check_cpu(logits, op, "logits");
  cpu::check_dim(logits, 2, op, "logits [T, V]");
  cpu::check_float(logits, true, op, "logits");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= INT32_MAX, op,
              ": logits must have a vocabulary dimension in [1, 2^31), got ", logits.sizes());
}

// Row r of logits [T, V] as float into z [V].
void load_row(const torch::Tensor& logits, int64_t r, float* z) {
  const int64_t vocab = logits.size(1);
  cpu::dispatch_float(logits.scalar_type(), [&](auto* tag) {
    using T = cpu::elem_t<decltype(tag)>;
    const T* src = logits.data_ptr<T>() + r * vocab;
    for (int64_t i = 0; i < vocab; ++i) z[i] = cpu::to_float(src[i]);
  });
}

// The draw of token r: counter counters[r] of seeds[r].
inline double draw(const int64_t* seeds, const int64_t* counters, int64_t r) {
  return uniform_from_counter(static_cast<uint64_t>(seeds[r]), static_cast<uint64_t>(counters[r]));
}

// Sort key of token i with logit z: keys ascending = logits descending, ties by lower index first.
// The float's bits mapped to an unsigned integer of the same order (-0 folded into +0), inverted,
// above the index: sorting plain integers beats an indirect comparator.
inline uint64_t rank_key(float z, int64_t i) {
  const float zc = z + 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &zc, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending with z
  return (static_cast<uint64_t>(static_cast<uint32_t>(~bits)) << 32) | static_cast<uint32_t>(i);
}

inline int64_t key_index(uint64_t key) { return static_cast<int64_t>(key & 0xFFFFFFFFull); }

// Filtered, renormalised probabilities of one row (see the file comment). z [V] logits, out [V].
void filter_row(const char* op, const float* z, int64_t vocab, float temperature, int64_t top_k, double top_p,
                float* out, int64_t row) {
  cpu::check_logits_row(z, vocab, op, row);
  const float zmax = cpu::max_value(z, vocab);
  TORCH_CHECK(std::isfinite(zmax), op, ": logits row ", row,
              " must have a finite maximum (entries finite or -inf), got max ", zmax);
  if (temperature == 0.0f) {  // greedy: all the mass on the first argmax
    std::fill(out, out + vocab, 0.0f);
    out[cpu::argmax(z, vocab)] = 1.0f;
    return;
  }
  const float inv_t = 1.0f / temperature;
  for (int64_t i = 0; i < vocab; ++i) out[i] = cpu::exp_fast((z[i] - zmax) * inv_t);  // e [V]

  const int64_t k = (top_k == 0 || top_k >= vocab) ? vocab : top_k;
  if (k == vocab && top_p >= 1.0) {
    const float inv_sum = 1.0f / cpu::sum(out, vocab);
    for (int64_t i = 0; i < vocab; ++i) out[i] *= inv_sum;
    return;
  }
  // Coarse histogram over (zmax - z) / T in buckets of width 1/2 (the last one open-ended): bucket
  // sets {bucket <= b} are prefixes of the order, so they bound where the top-k and the nucleus end
  // and only those candidates need sorting.
  constexpr int kBuckets = 128;
  auto bucket = [&](int64_t i) {
    const float key = (zmax - z[i]) * inv_t;
    return key < 63.5f ? static_cast<int>(key * 2.0f) : kBuckets - 1;
  };
  std::array<int64_t, kBuckets> count{};
  std::array<double, kBuckets> bucket_mass{};
  for (int64_t i = 0; i < vocab; ++i) {
    const int b = bucket(i);
    ++count[b];
    bucket_mass[b] += out[i];
  }
  int bk = kBuckets - 1;  // the buckets up to bk hold the top-k
  for (int64_t b = 0, c = 0; b < kBuckets && k < vocab; ++b) {
    if ((c += count[b]) >= k) {
      bk = static_cast<int>(b);
      break;
    }
  }
  int bp = bk;  // the buckets up to bp hold (up to rounding) top_p of an upper bound of the top-k mass
  if (top_p < 1.0) {
    double bound = 0.0, cum = 0.0;
    for (int b = 0; b <= bk; ++b) bound += bucket_mass[b];
    for (int b = 0; b <= bk; ++b) {
      if ((cum += bucket_mass[b]) >= top_p * bound) {
        bp = b;
        break;
      }
    }
  }

  std::vector<uint64_t> order;  // rank keys of the candidates (buckets <= bk)
  order.reserve(k < vocab ? 2 * k : vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    if (bucket(i) <= bk) order.push_back(rank_key(z[i], i));
  }
  if (k < static_cast<int64_t>(order.size())) std::nth_element(order.begin(), order.begin() + k, order.end());

  int64_t kept = k;  // order[0, k) is the top-k
  if (top_p < 1.0) {
    double mass_k = 0.0;
    for (int64_t j = 0; j < k; ++j) mass_k += out[key_index(order[j])];
    const double threshold = top_p * mass_k;
    // Sort a growing head of the top-k until its running mass reaches the threshold: the nucleus
    // is a prefix of the order, so it lies inside the first m once their mass reaches it. The
    // first head is the buckets up to bp (a prefix of the order, moved to the front).
    const int64_t head = std::partition(order.begin(), order.begin() + k,
                                        [&](uint64_t key) { return bucket(key_index(key)) <= bp; }) -
                         order.begin();
    int64_t m = head > 0 ? head : std::min<int64_t>(k, 64);
    for (;;) {
      if (m < k && m != head) std::nth_element(order.begin(), order.begin() + m, order.begin() + k);
      std::sort(order.begin(), order.begin() + m);
      double cum = 0.0;
      int64_t n = 0;
      while (n < m && cum < threshold) cum += out[key_index(order[n++])];
      if (cum >= threshold || m == k) {
        kept = std::max<int64_t>(n, 1);
        break;
      }
      m = std::min<int64_t>(k, std::max<int64_t>(m * 8, 64));
    }
  }
  double mass = 0.0;
  for (int64_t j = 0; j < kept; ++j) mass += out[key_index(order[j])];
  std::vector<float> keep_e(kept);
  for (int64_t j = 0; j < kept; ++j) keep_e[j] = out[key_index(order[j])];
  std::fill(out, out + vocab, 0.0f);
  const float inv_mass = static_cast<float>(1.0 / mass);
  for (int64_t j = 0; j < kept; ++j) out[key_index(order[j])] = keep_e[j] * inv_mass;
}

// out [T, V] = filtered probabilities of logits [T, V] with per-token parameters (checked).
void filtered_probs(const char* op, float* out, const torch::Tensor& logits, const torch::Tensor& temperature,
                    const torch::Tensor& top_k, const torch::Tensor& top_p) {
  const auto x = logits.contiguous();
  const auto temp = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  cpu::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(vocab);
    for (int64_t r = begin; r < end; ++r) {
      load_row(x, r, z.data());
      filter_row(op, z.data(), vocab, static_cast<float>(temp.data_ptr<double>()[r]), k.data_ptr<int64_t>()[r],
                 p.data_ptr<double>()[r], out + r * vocab, r);
    }
  });
}

// out [T] = draws from the rows of probs [T, V] float32 contiguous (op names the calling op in errors).
void draw_tokens(const char* op, int64_t* out, const float* probs, int64_t rows, int64_t vocab,
                 const torch::Tensor& seeds, const torch::Tensor& counters) {
  const auto s = seeds.contiguous(), c = counters.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  cpu::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = probs + r * vocab;
      const double total = cpu::row_mass(row, vocab, op, "probs", r);
      TORCH_CHECK(total > 0.0 && std::isfinite(total), op, ": probs row ", r, " must have a positive finite sum, got ",
                  total);
      out[r] = cpu::invert_cdf(row, vocab, draw(sp, cp, r) * total);
    }
  });
}

void check_draw_args(const char* op, int64_t tokens, const torch::Tensor& seeds, const torch::Tensor& counters) {
  cpu::check_vector(seeds, tokens, at::kLong, op, "seeds");
  cpu::check_vector(counters, tokens, at::kLong, op, "counters");
  cpu::check_indices(counters, INT64_MAX, op, "counters", "counters must be >= 0");
}

}  // namespace

void sampling_probs_cpu(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
                        const torch::Tensor& top_k, const torch::Tensor& top_p) {
  const char* op = "sampling_probs";
  check_logits(op, logits);
  check_filter_args(op, logits.size(0), temperature, top_k, top_p);
  cpu::check_out(out, logits.sizes(), at::kFloat, op, "out [T, V]");
  filtered_probs(op, out.data_ptr<float>(), logits, temperature, top_k, top_p);
}

void sample_from_probs_cpu(torch::Tensor& out, const torch::Tensor& probs, const torch::Tensor& seeds,
                           const torch::Tensor& counters) {
  const char* op = "sample_from_probs";
  cpu::check_cpu(probs, op, "probs");
  cpu::check_dim(probs, 2, op, "probs [T, V]");
  cpu::check_float(probs, false, op, "probs");
  TORCH_CHECK(probs.size(1) > 0, op, ": probs must have a non-empty vocabulary dimension, got ", probs.sizes());
  const int64_t rows = probs.size(0);
  check_draw_args(op, rows, seeds, counters);
  cpu::check_out(out, {rows}, at::kLong, op, "out [T]");
  const auto p = probs.contiguous();
  draw_tokens(op, out.data_ptr<int64_t>(), p.data_ptr<float>(), rows, p.size(1), seeds, counters);
}

void sample_cpu(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
                const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& seeds,
                const torch::Tensor& counters) {
  const char* op = "sample";
  check_logits(op, logits);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_filter_args(op, rows, temperature, top_k, top_p);
  check_draw_args(op, rows, seeds, counters);
  cpu::check_out(out, {rows}, at::kLong, op, "out [T]");
  const auto x = logits.contiguous();
  const auto temp = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const auto s = seeds.contiguous(), c = counters.contiguous();
  int64_t* o = out.data_ptr<int64_t>();
  cpu::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(vocab), probs;
    for (int64_t r = begin; r < end; ++r) {
      load_row(x, r, z.data());
      const double t = temp.data_ptr<double>()[r];
      if (t == 0.0) {  // greedy: the first index of the row maximum, no softmax
        cpu::check_logits_row(z.data(), vocab, op, r);
        o[r] = cpu::argmax(z.data(), vocab);
        continue;
      }
      probs.resize(vocab);
      filter_row(op, z.data(), vocab, static_cast<float>(t), k.data_ptr<int64_t>()[r], p.data_ptr<double>()[r],
                 probs.data(), r);
      const double total = cpu::row_mass(probs.data(), vocab, op, "probs", r);
      o[r] = cpu::invert_cdf(probs.data(), vocab, draw(s.data_ptr<int64_t>(), c.data_ptr<int64_t>(), r) * total);
    }
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("sampling_probs", &sampling_probs_cpu);
  m.impl("sample_from_probs", &sample_from_probs_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace layerskip
