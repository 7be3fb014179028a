// layerskip::attention's AVX2 kernel (AVX2 + FMA: Haswell, Zen 1-3 and later), chosen at run time by
// attention.cpp where AVX-512 is missing. The structure of attention_kernel_avx512.cpp (read its header) on
// 8-lane vectors and 16 registers: a run of tokens of one row against one kv head, all query heads of the group
// together; scores of 8 keys reduced together; value accumulators in registers, passes of up to 3 query rows
// over slices of up to 32 dims. Built with its own target flags, so no torch headers and no std:: templates.
//
// The arithmetic of one (token, head) output, the same whatever run, pass or block it falls in:
//   score_j = scale * q . k_j: lane l (0..7) accumulates q[d] k_j[d] for d = l, l + 8, ... ascending (the
//     first product rounded, then fused multiply-adds), then the 8 lanes are summed by the fixed tree of sum8
//     (pairs (l, l + 1), then pairs of pairs, within each 128-bit half, then the two halves).
//   m = max_j score_j; e_j = exp(score_j - m) (exp8: the polynomial of cpu::exp_fast in fused multiply-adds);
//   sum = 8 lanes over j = l, l + 8, ... ascending, then the lanes summed by hsum8's fixed tree.
//   out[d] = (sum_j e_j v_j[d], fused multiply-adds in ascending j from 0) * (1 / sum).
// no-avx512f: the build's -march=native would otherwise let GCC use AVX-512 here too (the pragma adds to it), and
// forcing this kernel on an AVX-512 machine would not test the code an AVX2-only CPU runs.
#pragma GCC target("avx2,fma,no-avx512f,tune=generic")
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_kernels.h"

namespace layerskip {
namespace attention_kernels {
namespace {

constexpr int64_t kLanes = 8;
constexpr int kMaxQueriesPerPass = 8;  // query rows of one score pass

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }
inline int64_t round_up8(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// 8 elements widened to float32 (bfloat16: exactly, a 16-bit shift).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// The first n elements (n < 8: zeros after them; memory past them is not touched).
template <typename T>
inline __m256 load8(const T* p, int64_t n) {
  if (n >= kLanes) return load8(p);
  T tmp[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return load8(tmp);
}

// Stores the first n (<= 8) lanes of x, as float32 or rounded to bfloat16 (nearest even, NaN -> 0x7FC0, as
// c10::BFloat16 does).
inline void store8(float* p, __m256 x, int64_t n) {
  if (n >= kLanes) return _mm256_storeu_ps(p, x);
  float tmp[kLanes];
  _mm256_storeu_ps(tmp, x);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
inline void store8(uint16_t* p, __m256 x, int64_t n) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i high = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  high = _mm256_blendv_epi8(high, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(high, high);  // per 128-bit half: its 4 values twice
  const __m128i half = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  if (n >= kLanes) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half);
  uint16_t tmp[kLanes];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), half);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}

// Lane k of the result = the sum of the 8 lanes of v[k] (the fixed tree described at the top).
inline __m256 sum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// exp(x), the algorithm of cpu::exp_fast (reductions.h): Cody-Waite reduction, a degree-6 polynomial, 2^n from
// the exponent bits; 0 below -87 (and for -inf), NaN stays NaN.
inline __m256 exp8(__m256 x) {
  __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // NaN -> -87 (fixed below)
  xc = _mm256_min_ps(xc, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
  e = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), e);  // x < -87: 0
  return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Phase 1 on one slice of NC chunks of 8 dims: part[r * 8 + jj] (r < rq, jj < nb) += the lane products of query
// row r (q + r * dp) and key row jj (k + jj * D) over the slice; `first`: the slice starts at dim 0. last_n: the
// valid dims of the slice's last chunk, read apart only where kTail (head_dim not a multiple of 8: the partial
// load goes through the stack, which would otherwise keep the whole key row there too).
template <int NC, bool kTail, typename C>
void score_slice(const float* q, int64_t dp, int rq, const C* k, int64_t D, int64_t nb, int64_t last_n, bool first,
                 __m256* part) {
  for (int64_t jj = 0; jj < nb; ++jj) {
    const C* kr = k + jj * D;
    __m256 kv[NC];
    for (int c = 0; c < NC; ++c)
      kv[c] = !kTail || c + 1 < NC ? load8(kr + c * kLanes) : load8(kr + c * kLanes, last_n);
    for (int r = 0; r < rq; ++r) {
      const float* qr = q + r * dp;
      __m256 a = first ? _mm256_mul_ps(_mm256_load_ps(qr), kv[0])
                       : _mm256_fmadd_ps(_mm256_load_ps(qr), kv[0], part[r * kLanes + jj]);
      for (int c = 1; c < NC; ++c) a = _mm256_fmadd_ps(_mm256_load_ps(qr + c * kLanes), kv[c], a);
      part[r * kLanes + jj] = a;
    }
  }
}

// Phase 3 on one slice of NC chunks for RV query rows: out_r[slice] = (sum_{j < n[r]} w_r[j] v_j[slice]) * inv[r].
template <int NC, int RV, bool kTail, typename C, typename O>
void value_slice(const float* const* w, const int64_t* n, int64_t n_lo, int64_t n_hi, const float* inv,
                 O* const* out, const C* v, int64_t D, int64_t last_n) {
  __m256 acc[RV][NC];
  for (int r = 0; r < RV; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n_lo; ++j) {
    const C* vr = v + j * D;
    for (int c = 0; c < NC; ++c) {
      const __m256 vv = !kTail || c + 1 < NC ? load8(vr + c * kLanes) : load8(vr + c * kLanes, last_n);
      for (int r = 0; r < RV; ++r) acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(w[r][j]), vv, acc[r][c]);
    }
  }
  for (int64_t j = n_lo; j < n_hi; ++j) {
    const C* vr = v + j * D;
    for (int c = 0; c < NC; ++c) {
      const __m256 vv = !kTail || c + 1 < NC ? load8(vr + c * kLanes) : load8(vr + c * kLanes, last_n);
      for (int r = 0; r < RV; ++r)
        if (j < n[r]) acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(w[r][j]), vv, acc[r][c]);
    }
  }
  for (int r = 0; r < RV; ++r) {
    const __m256 s = _mm256_set1_ps(inv[r]);
    for (int c = 0; c < NC; ++c) store8(out[r] + c * kLanes, _mm256_mul_ps(acc[r][c], s), c + 1 < NC ? kLanes : last_n);
  }
}

// Query rows per value pass for a slice of NC chunks (accumulators, one value chunk and a broadcast weight in
// the 16 vector registers).
constexpr int max_rows(int nc) { return nc >= 4 ? 3 : nc >= 2 ? 6 : 8; }

template <int NC, int RV, typename C, typename O>
void value_dispatch(int rv, const float* const* w, const int64_t* n, int64_t n_lo, int64_t n_hi, const float* inv,
                    O* const* out, const C* v, int64_t D, int64_t last_n) {
  if constexpr (RV >= 1) {
    if (rv != RV) return value_dispatch<NC, RV - 1, C, O>(rv, w, n, n_lo, n_hi, inv, out, v, D, last_n);
    if (last_n < kLanes) return value_slice<NC, RV, true, C, O>(w, n, n_lo, n_hi, inv, out, v, D, last_n);
    value_slice<NC, RV, false, C, O>(w, n, n_lo, n_hi, inv, out, v, D, last_n);
  }
}

template <int NC, typename C>
void score_dispatch(const float* q, int64_t dp, int rq, const C* k, int64_t D, int64_t nb, int64_t last_n,
                    bool first, __m256* part) {
  if (last_n < kLanes) return score_slice<NC, true>(q, dp, rq, k, D, nb, last_n, first, part);
  score_slice<NC, false>(q, dp, rq, k, D, nb, last_n, first, part);
}

// Slices of a head's chunks of 8 dims: up to 8 chunks for the scores, up to 4 for the values.
inline int score_slice_chunks(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }
inline int value_slice_chunks(int64_t left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

template <typename C, typename Q>
void run_typed(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch) {
  const int64_t D = p.head_dim, G = p.q_heads / p.kv_heads, tokens = t1 - t0, R = tokens * G;
  const int64_t dp = round_up8(D);  // <= the header's round-up to 16: the scratch holds this layout
  int64_t n_max = 0;
  for (int64_t t = t0; t < t1; ++t) n_max = max64(n_max, p.positions[t] + 1);
  const int64_t np = round_up8(n_max);
  float* qbuf = scratch;                                         // [R, dp]
  float* scores = qbuf + R * dp;                                 // [R, np]
  float* sums = scores + R * np;                                 // [R, 8]: the softmax's 1 / sum in lane 0
  __m256* part = reinterpret_cast<__m256*>(sums + R * kLanes);  // [8, 8]
  const int64_t head = (row * p.kv_heads + kvh) * p.capacity * D;
  const C* kc = static_cast<const C*>(p.k_cache) + head;  // [S, D]
  const C* vc = static_cast<const C*>(p.v_cache) + head;  // [S, D]
  auto n_of = [&](int64_t r) { return p.positions[t0 + r / G] + 1; };

  // pre-scaled query rows, zero past D; row r = (token t0 + r / G, head kvh * G + r % G)
  const __m256 scale = _mm256_set1_ps(p.scale);
  for (int64_t r = 0; r < R; ++r) {
    const Q* qr = static_cast<const Q*>(p.query) + (t0 + r / G) * p.q_stride_t + (kvh * G + r % G) * p.q_stride_h;
    for (int64_t d = 0; d < dp; d += kLanes)
      _mm256_store_ps(qbuf + r * dp + d, _mm256_mul_ps(load8(qr + d, D - d), scale));
  }

  const int64_t chunks = dp / kLanes;
  auto last_dims = [&](int64_t c0, int64_t nc) { return D - (c0 + nc - 1) * kLanes; };  // of the slice's last chunk

  // 1. scores [R, n_max]
  for (int64_t j0 = 0; j0 < n_max; j0 += kLanes) {
    const int64_t nb = min64(kLanes, n_max - j0);
    for (int64_t r0 = 0; r0 < R; r0 += kMaxQueriesPerPass) {
      const int rq = static_cast<int>(min64(kMaxQueriesPerPass, R - r0));
      for (int r = 0; r < rq; ++r)
        for (int64_t jj = nb; jj < kLanes; ++jj) part[r * kLanes + jj] = _mm256_setzero_ps();
      for (int64_t c0 = 0, nc; c0 < chunks; c0 += nc) {
        nc = score_slice_chunks(chunks - c0);
        const float* q = qbuf + r0 * dp + c0 * kLanes;
        const C* k = kc + j0 * D + c0 * kLanes;
        const int64_t last_n = last_dims(c0, nc);
        switch (nc) {
          case 8: score_dispatch<8>(q, dp, rq, k, D, nb, last_n, c0 == 0, part); break;
          case 4: score_dispatch<4>(q, dp, rq, k, D, nb, last_n, c0 == 0, part); break;
          case 2: score_dispatch<2>(q, dp, rq, k, D, nb, last_n, c0 == 0, part); break;
          default: score_dispatch<1>(q, dp, rq, k, D, nb, last_n, c0 == 0, part); break;
        }
      }
      for (int r = 0; r < rq; ++r) _mm256_store_ps(scores + (r0 + r) * np + j0, sum8(part + r * kLanes));
    }
  }

  // 2. softmax of each row over its own keys (its slots past n_r up to the next multiple of 8 set to -inf, whose
  // exp is 0): scores become e_j = exp(score_j - max), sums[r] = 1 / sum_j e_j
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * np;
    const int64_t n = n_of(r);
    for (int64_t j = n; j < round_up8(n); ++j) s[j] = -__builtin_inff();
    __m256 mx = _mm256_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < n; j += kLanes) mx = _mm256_max_ps(mx, _mm256_load_ps(s + j));
    const __m256 m = _mm256_set1_ps(hmax8(mx));
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += kLanes) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), m));
      _mm256_store_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    sums[r * kLanes] = 1.0f / hsum8(total);
  }

  // 3. values, passes of up to max_rows(nc) query rows per slice
  Q* out = static_cast<Q*>(p.out);
  for (int64_t c0 = 0, nc; c0 < chunks; c0 += nc) {
    nc = value_slice_chunks(chunks - c0);
    const int rows_per_pass = max_rows(static_cast<int>(nc));
    const C* v = vc + c0 * kLanes;
    const int64_t last_n = last_dims(c0, nc);
    for (int64_t r0 = 0; r0 < R; r0 += rows_per_pass) {
      const int rv = static_cast<int>(min64(rows_per_pass, R - r0));
      const float* w[8];
      int64_t n[8];
      float inv[8];
      Q* o[8];
      int64_t n_lo = INT64_MAX, n_hi = 0;
      for (int i = 0; i < rv; ++i) {
        const int64_t r = r0 + i;
        w[i] = scores + r * np;
        n[i] = n_of(r);
        inv[i] = sums[r * kLanes];
        o[i] = out + ((t0 + r / G) * p.q_heads + kvh * G + r % G) * D + c0 * kLanes;
        n_lo = min64(n_lo, n[i]);
        n_hi = max64(n_hi, n[i]);
      }
      switch (nc) {
        case 4: value_dispatch<4, max_rows(4)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last_n); break;
        case 2: value_dispatch<2, max_rows(2)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last_n); break;
        default: value_dispatch<1, max_rows(1)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last_n); break;
      }
    }
  }
}

}  // namespace

void run_avx2(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch) {
  if (p.ctype == kF32) {
    if (p.qtype == kF32) return run_typed<float, float>(p, row, t0, t1, kvh, scratch);
    return run_typed<float, uint16_t>(p, row, t0, t1, kvh, scratch);
  }
  if (p.qtype == kF32) return run_typed<uint16_t, float>(p, row, t0, t1, kvh, scratch);
  run_typed<uint16_t, uint16_t>(p, row, t0, t1, kvh, scratch);
}

}  // namespace attention_kernels
}  // namespace layerskip
