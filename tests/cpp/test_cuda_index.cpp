// ctest: the index arithmetic of the CUDA kernels (csrc/cuda/index.h, __host__ __device__ functions) run on
// the host, so that this part of every kernel is checked on machines without a GPU. Each helper is compared
// against a direct computation (nested loops, std::sort), including the radix selection that the sampling
// kernel uses for top-k / top-p, simulated here bin by bin. Exit code 0 = pass.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cuda/index.h"

namespace {

using namespace layerskip::cuda;

int failures = 0;

#define EXPECT(cond, ...)                \
  do {                                   \
    if (!(cond)) {                       \
      ++failures;                        \
      std::printf("FAIL %s: ", #cond);   \
      std::printf(__VA_ARGS__);          \
      std::printf("\n");                 \
    }                                    \
  } while (0)

void test_split_range() {
  for (int64_t n : {0, 1, 5, 31, 32, 33, 1000, 49152}) {
    for (int64_t parts : {1, 2, 3, 32, 1024}) {
      int64_t next = 0, max_len = 0, min_len = n;
      for (int64_t i = 0; i < parts; ++i) {
        const Range r = split_range(i, parts, n);
        EXPECT(r.begin == next, "n=%lld parts=%lld part %lld starts at %lld, expected %lld", (long long)n,
               (long long)parts, (long long)i, (long long)r.begin, (long long)next);
        next = r.end;
        max_len = std::max(max_len, r.end - r.begin);
        min_len = std::min(min_len, r.end - r.begin);
      }
      EXPECT(next == n, "n=%lld parts=%lld ends at %lld", (long long)n, (long long)parts, (long long)next);
      EXPECT(max_len - min_len <= 1, "n=%lld parts=%lld unbalanced", (long long)n, (long long)parts);
    }
  }
  EXPECT(ceil_div(10, 3) == 4 && ceil_div(9, 3) == 3 && ceil_div(0, 3) == 0, "ceil_div");
}

void test_gqa_and_cache() {
  // query heads are split into Hkv contiguous groups of Hq / Hkv heads
  for (int64_t kv : {1, 2, 3, 8}) {
    for (int64_t group : {1, 3, 4}) {
      const int64_t hq = kv * group;
      int64_t h = 0;
      for (int64_t g = 0; g < kv; ++g) {
        for (int64_t j = 0; j < group; ++j, ++h) {
          EXPECT(kv_head_of(h, hq, kv) == g, "Hq=%lld Hkv=%lld h=%lld", (long long)hq, (long long)kv, (long long)h);
        }
      }
    }
  }
  // cache [H, S, D] contiguous: offsets enumerate the elements in order
  const int64_t H = 3, S = 5, D = 4;
  int64_t expected = 0;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t s = 0; s < S; ++s, expected += D) {
      EXPECT(cache_offset(h, s, S, D) == expected, "h=%lld s=%lld", (long long)h, (long long)s);
    }
  }
}

void test_visible_keys_and_clamp() {
  // without positions: query t of a block at start_pos sees start_pos + t + 1 slots (the CPU op's rule)
  for (int64_t start : {0, 3, 10}) {
    for (int64_t t = 0; t < 4; ++t) {
      EXPECT(visible_keys(start, t, -1, 100) == start + t + 1, "start=%lld t=%lld", (long long)start, (long long)t);
    }
  }
  EXPECT(visible_keys(0, 0, 7, 100) == 8, "positions[t] = 7 sees 8 slots");
  EXPECT(visible_keys(50, 3, 7, 100) == 8, "a given position overrides start_pos + t");
  EXPECT(visible_keys(0, 0, 500, 100) == 100, "clamped to the capacity");
  bool bad = false;
  EXPECT(clamp_index(4, 10, &bad) == 4 && !bad, "in range");
  EXPECT(clamp_index(-3, 10, &bad) == 0 && bad, "below");
  EXPECT(clamp_index(10, 10, &bad) == 9 && bad, "above");
}

void test_linear_tile() {
  for (int64_t t = -1; t <= 70; ++t) {
    const int tile = linear_row_tile(t);
    if (t < 1 || t > 64) {
      EXPECT(tile == 0, "T=%lld must not have a tile, got %d", (long long)t, tile);
    } else {
      const int expect = t == 1 ? 1 : t <= 8 ? 8 : 64;
      EXPECT(tile == expect && tile >= t, "T=%lld tile %d", (long long)t, tile);
    }
  }
}

// Keys in ascending order must list tokens by logit descending, ties by lower index first.
void test_rank_key(std::mt19937& rng) {
  std::vector<float> z = {1.0f, -0.0f, 0.0f, 2.5f, 2.5f, -std::numeric_limits<float>::infinity(), -7.0f, 1e-30f,
                          -1e-30f, 3.4e38f};
  std::normal_distribution<float> normal(0.f, 3.f);
  for (int i = 0; i < 200; ++i) z.push_back(std::round(normal(rng) * 4.f) / 4.f);  // many ties
  std::vector<int64_t> by_key(z.size()), by_sort(z.size());
  for (size_t i = 0; i < z.size(); ++i) by_key[i] = by_sort[i] = static_cast<int64_t>(i);
  std::sort(by_key.begin(), by_key.end(), [&](int64_t a, int64_t b) { return rank_key(z[a], a) < rank_key(z[b], b); });
  std::stable_sort(by_sort.begin(), by_sort.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
  EXPECT(by_key == by_sort, "rank_key order differs from a stable sort by logit descending");
}

// The sampling kernel's radix selection, bin by bin on the host: among keys <= limit, the key ending the
// prefix whose count (weights 1) or mass (weights e) first reaches target.
uint64_t simulate_select(const std::vector<uint64_t>& keys, const std::vector<double>& weight, uint64_t limit,
                         double target) {
  uint64_t prefix = 0;
  double below = 0.0;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    double bins[kRadixBins] = {};
    for (size_t i = 0; i < keys.size(); ++i) {
      if (keys[i] <= limit && radix_matches(keys[i], prefix, pass)) bins[radix_digit(keys[i], pass)] += weight[i];
    }
    const int b = radix_pick_bin(bins, &below, target);
    prefix = radix_set_digit(prefix, pass, b);
  }
  return prefix;
}

void test_radix_select(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 2.f);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t V = 50 + trial * 37;
    std::vector<float> z(V);
    for (auto& v : z) v = std::round(normal(rng) * 8.f) / 8.f;  // ties
    std::vector<uint64_t> keys(V);
    std::vector<double> ones(V, 1.0), e(V);
    for (int64_t i = 0; i < V; ++i) keys[i] = rank_key(z[i], i), e[i] = std::exp(z[i]);
    std::vector<uint64_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end());
    // top-k: the k-th smallest key
    for (int64_t k : {int64_t(1), int64_t(2), V / 3, V - 1, V}) {
      const uint64_t got = simulate_select(keys, ones, ~0ull, static_cast<double>(k));
      EXPECT(got == sorted[k - 1], "V=%lld top-k %lld", (long long)V, (long long)k);
    }
    // top-p within the top-k: the first key (in order) whose running mass reaches top_p * mass of the top-k
    for (double top_p : {0.05, 0.5, 0.9, 0.999}) {
      const int64_t k = V / 2;
      const uint64_t limit = sorted[k - 1];
      double mass_k = 0.0;
      for (int64_t j = 0; j < k; ++j) mass_k += std::exp(z[sorted[j] & 0xffffffffu]);
      const double threshold = top_p * mass_k;
      double cum = 0.0;
      int64_t n = 0;
      while (n < k && cum < threshold) cum += std::exp(z[sorted[n++] & 0xffffffffu]);
      const uint64_t got = simulate_select(keys, e, limit, threshold);
      EXPECT(got == sorted[std::max<int64_t>(n, 1) - 1], "V=%lld top_p %g: kept %lld", (long long)V, top_p,
             (long long)n);
    }
  }
}

void test_speculative_counters() {
  // draws of a round at offset c with d drafts: 2i accept, 2i + 1 resample, 2d the bonus token
  const int64_t c = 17, d = 4;
  std::vector<uint64_t> used;
  for (int64_t i = 0; i < d; ++i) used.push_back(accept_counter(c, i)), used.push_back(resample_counter(c, i));
  used.push_back(bonus_counter(c, d));
  for (size_t j = 0; j < used.size(); ++j) EXPECT(used[j] == c + j, "counter %zu", j);
  EXPECT(accept_draft(0.3, 0.5f, 0.2f) && !accept_draft(0.5, 0.5f, 0.2f), "accept iff u * q(x) < p(x)");
  EXPECT(accept_draft(0.999, 0.1f, 0.2f), "p(x) >= q(x) always accepts");
  EXPECT(valid_prob(0.25f) == 0.25f && valid_prob(-1.f) == 0.f && valid_prob(NAN) == 0.f &&
             valid_prob(INFINITY) == 0.f,
         "valid_prob");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_split_range();
  test_gqa_and_cache();
  test_visible_keys_and_clamp();
  test_linear_tile();
  test_rank_key(rng);
  test_radix_select(rng);
  test_speculative_counters();
  if (failures == 0) std::printf("test_cuda_index: all passed\n");
  return failures == 0 ? 0 : 1;
}
