// layerskip::attention's AVX-512 kernel (AVX-512 F/BW/VL: Skylake-X, Zen 4 and later), chosen at run time by
// attention.cpp. One call computes a run of up to 8 tokens of one cache row against one kv head, for all the
// query heads of its group (R = tokens x group query rows), in three phases:
//   1. scores: keys in blocks of 16; each key row is loaded once (into registers, a slice of up to 8 x 16
//      floats at a time) for all R query rows; a (query, key) pair leaves 16 lane partial sums, and the 16 keys
//      of a block are reduced together (a transposing tree: 45 shuffles and adds per 16 keys instead of 16
//      horizontal sums);
//   2. softmax of each query row over its own keys [0, position]: max, exp, sum;
//   3. values: each value row is loaded once per pass of up to 8 query rows, whose accumulators stay in
//      registers; keys past a token's position are skipped for that token (they are never multiplied by 0).
// Built with its own target flags (not -march), so it includes no torch headers (attention_kernels.h).
//
// The arithmetic of one (token, head) output, the same whatever run, pass or block it falls in:
//   score_j = scale * q . k_j: lane l (0..15) accumulates q[d] k_j[d] for d = l, l + 16, ... ascending (the
//     first product rounded, then fused multiply-adds), then the 16 lanes are summed by the fixed tree of
//     sum16 (pairs (l, l + 2) within each 128-bit block, then the block's two halves, then blocks (0 + 1) and
//     (2 + 3), then those two). The query is pre-multiplied by scale (rounded to float once).
//   m = max_j score_j; e_j = exp(score_j - m) (exp16: the polynomial of cpu::exp_fast in fused multiply-adds);
//   sum = 16 lanes over j = l, l + 16, ... ascending, then the lanes summed by _mm512_reduce_add_ps's tree.
//   out[d] = (sum_j e_j v_j[d], fused multiply-adds in ascending j from 0) * (1 / sum).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,tune=generic")
// GCC 12's AVX-512 headers build some intrinsics on _mm512_undefined_*(), which -Wuninitialized reports (GCC bug
// 105593, fixed in 13): silence that false alarm in this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_kernels.h"

namespace layerskip {
namespace attention_kernels {
namespace {

constexpr int64_t kLanes = 16;
constexpr int kMaxQueriesPerPass = 8;  // query rows of one score pass (the partial sums stay in L1)

// Own min / max: std::min and std::max instantiated here would carry this file's target flags into weak symbols
// that the linker may pick for other translation units (a debug build does not inline them).
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

inline int64_t round_up16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

inline __mmask16 first_lanes(int64_t n) {  // the first min(n, 16) lanes
  return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 elements widened to float32 (bfloat16: exactly, a 16-bit shift); lanes outside `mask` read as 0 and
// are not touched in memory.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Stores the lanes in `mask` of x, as float32 or rounded to bfloat16 (nearest even, NaN -> 0x7FC0, as
// c10::BFloat16 does).
inline void store16(float* p, __m512 x, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, x); }
inline void store16(uint16_t* p, __m512 x, __mmask16 mask) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  half = _mm256_mask_mov_epi16(half, nan, _mm256_set1_epi16(0x7FC0));
  _mm256_mask_storeu_epi16(p, mask, half);
}

// Lane k of the result = the sum of the 16 lanes of v[k] (the fixed tree described at the top).
inline __m512 sum16(const __m512* v) {
  __m512 t[8];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 u[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// exp(x), the algorithm of cpu::exp_fast (reductions.h): Cody-Waite reduction, a degree-6 polynomial, 2^n by
// scalef; 0 below -87, NaN stays NaN.
inline __m512 exp16(__m512 x) {
  __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // NaN -> -87 (fixed below)
  xc = _mm512_min_ps(xc, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  __m512 e = _mm512_scalef_ps(p, n);
  e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), e);  // x < -87: 0
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// Phase 1 on one slice of NC chunks of 16 dims: part[r * 16 + jj] (r < rq, jj < nb) += the lane products of
// query row r (q + r * dp) and key row jj (k + jj * D) over the slice; `first`: the slice starts at dim 0 (the
// partial sums start from the first product). `last`: the valid lanes of the slice's last chunk.
template <int NC, typename C>
void score_slice(const float* q, int64_t dp, int rq, const C* k, int64_t D, int64_t nb, __mmask16 last, bool first,
                 __m512* part) {
  for (int64_t jj = 0; jj < nb; ++jj) {
    const C* kr = k + jj * D;
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = c + 1 < NC ? load16(kr + c * kLanes) : load16(kr + c * kLanes, last);
    for (int r = 0; r < rq; ++r) {
      const float* qr = q + r * dp;
      __m512 a = first ? _mm512_mul_ps(_mm512_load_ps(qr), kv[0])
                       : _mm512_fmadd_ps(_mm512_load_ps(qr), kv[0], part[r * kLanes + jj]);
      for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(_mm512_load_ps(qr + c * kLanes), kv[c], a);
      part[r * kLanes + jj] = a;
    }
  }
}

// Phase 3 on one slice of NC chunks for RV query rows: out_r[slice] = (sum_{j < n[r]} w_r[j] v_j[slice]) * inv[r],
// keys [0, n_lo) shared by all RV rows, [n_lo, n_hi) for the rows that reach them.
template <int NC, int RV, typename C, typename O>
void value_slice(const float* const* w, const int64_t* n, int64_t n_lo, int64_t n_hi, const float* inv,
                 O* const* out, const C* v, int64_t D, __mmask16 last) {
  __m512 acc[RV][NC];
  for (int r = 0; r < RV; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_lo; ++j) {
    const C* vr = v + j * D;
    for (int c = 0; c < NC; ++c) {
      const __m512 vv = c + 1 < NC ? load16(vr + c * kLanes) : load16(vr + c * kLanes, last);
      for (int r = 0; r < RV; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[r][j]), vv, acc[r][c]);
    }
  }
  for (int64_t j = n_lo; j < n_hi; ++j) {
    const C* vr = v + j * D;
    for (int c = 0; c < NC; ++c) {
      const __m512 vv = c + 1 < NC ? load16(vr + c * kLanes) : load16(vr + c * kLanes, last);
      for (int r = 0; r < RV; ++r)
        if (j < n[r]) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[r][j]), vv, acc[r][c]);
    }
  }
  for (int r = 0; r < RV; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NC; ++c)
      store16(out[r] + c * kLanes, _mm512_mul_ps(acc[r][c], s), c + 1 < NC ? static_cast<__mmask16>(0xFFFF) : last);
  }
}

// Query rows per value pass for a slice of NC chunks: their accumulators (RV x NC registers) plus one value
// chunk fit in the 32 vector registers.
constexpr int max_rows(int nc) { return nc >= 8 ? 3 : nc >= 4 ? 6 : 8; }

template <int NC, int RV, typename C, typename O>
void value_dispatch(int rv, const float* const* w, const int64_t* n, int64_t n_lo, int64_t n_hi, const float* inv,
                    O* const* out, const C* v, int64_t D, __mmask16 last) {
  if constexpr (RV >= 1) {
    if (rv == RV) return value_slice<NC, RV, C, O>(w, n, n_lo, n_hi, inv, out, v, D, last);
    value_dispatch<NC, RV - 1, C, O>(rv, w, n, n_lo, n_hi, inv, out, v, D, last);
  }
}

// The slices of a head: its chunks of 16 dims in pieces of 8, 4, 2, 1 (head_dim 64: one slice of 4; 128: one of
// 8; 80: 4 + 1). The size of the slice that starts with `left` chunks to go:
inline int slice_chunks(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

template <typename C, typename Q>
void run_typed(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch) {
  const int64_t D = p.head_dim, G = p.q_heads / p.kv_heads, tokens = t1 - t0, R = tokens * G;
  const int64_t dp = round_up16(D);
  int64_t n_max = 0;
  for (int64_t t = t0; t < t1; ++t) n_max = max64(n_max, p.positions[t] + 1);
  const int64_t np = round_up16(n_max);
  float* qbuf = scratch;                                         // [R, dp]
  float* scores = qbuf + R * dp;                                 // [R, np]
  float* sums = scores + R * np;                                 // [R, 16]: the softmax's 1 / sum in lane 0
  __m512* part = reinterpret_cast<__m512*>(sums + R * kLanes);  // [8, 16]
  const int64_t head = (row * p.kv_heads + kvh) * p.capacity * D;
  const C* kc = static_cast<const C*>(p.k_cache) + head;  // [S, D]
  const C* vc = static_cast<const C*>(p.v_cache) + head;  // [S, D]
  auto n_of = [&](int64_t r) { return p.positions[t0 + r / G] + 1; };

  // pre-scaled query rows, zero past D; row r = (token t0 + r / G, head kvh * G + r % G)
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t r = 0; r < R; ++r) {
    const Q* qr = static_cast<const Q*>(p.query) + (t0 + r / G) * p.q_stride_t + (kvh * G + r % G) * p.q_stride_h;
    for (int64_t d = 0; d < dp; d += kLanes)
      _mm512_store_ps(qbuf + r * dp + d, _mm512_mul_ps(load16(qr + d, first_lanes(D - d)), scale));
  }

  const int64_t chunks = dp / kLanes;
  // the valid lanes of the last chunk of the slice [c0, c0 + nc)
  auto slice_mask = [&](int64_t c0, int nc) { return first_lanes(D - (c0 + nc - 1) * kLanes); };

  // 1. scores [R, n_max]
  for (int64_t j0 = 0; j0 < n_max; j0 += kLanes) {
    const int64_t nb = min64(kLanes, n_max - j0);
    for (int64_t r0 = 0; r0 < R; r0 += kMaxQueriesPerPass) {
      const int rq = static_cast<int>(min64(kMaxQueriesPerPass, R - r0));
      for (int r = 0; r < rq; ++r)
        for (int64_t jj = nb; jj < kLanes; ++jj) part[r * kLanes + jj] = _mm512_setzero_ps();
      for (int64_t c0 = 0, nc; c0 < chunks; c0 += nc) {
        nc = slice_chunks(chunks - c0);
        const float* q = qbuf + r0 * dp + c0 * kLanes;
        const C* k = kc + j0 * D + c0 * kLanes;
        const __mmask16 last = slice_mask(c0, static_cast<int>(nc));
        switch (nc) {
          case 8: score_slice<8>(q, dp, rq, k, D, nb, last, c0 == 0, part); break;
          case 4: score_slice<4>(q, dp, rq, k, D, nb, last, c0 == 0, part); break;
          case 2: score_slice<2>(q, dp, rq, k, D, nb, last, c0 == 0, part); break;
          default: score_slice<1>(q, dp, rq, k, D, nb, last, c0 == 0, part); break;
        }
      }
      for (int r = 0; r < rq; ++r) _mm512_store_ps(scores + (r0 + r) * np + j0, sum16(part + r * kLanes));
    }
  }

  // 2. softmax of each row over its own keys: scores become e_j = exp(score_j - max), sums[r] = 1 / sum_j e_j
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * np;
    const int64_t n = n_of(r);
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < n; j += kLanes) mx = _mm512_mask_max_ps(mx, first_lanes(n - j), mx, _mm512_load_ps(s + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += kLanes) {
      const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - j), exp16(_mm512_sub_ps(_mm512_load_ps(s + j), m)));
      _mm512_store_ps(s + j, e);
      total = _mm512_add_ps(total, e);
    }
    sums[r * kLanes] = 1.0f / _mm512_reduce_add_ps(total);
  }

  // 3. values, passes of up to max_rows(nc) query rows per slice
  Q* out = static_cast<Q*>(p.out);
  for (int64_t c0 = 0, nc; c0 < chunks; c0 += nc) {
    nc = slice_chunks(chunks - c0);
    const int rows_per_pass = max_rows(static_cast<int>(nc));
    const C* v = vc + c0 * kLanes;
    const __mmask16 last = slice_mask(c0, static_cast<int>(nc));
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
        case 8: value_dispatch<8, max_rows(8)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last); break;
        case 4: value_dispatch<4, max_rows(4)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last); break;
        case 2: value_dispatch<2, max_rows(2)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last); break;
        default: value_dispatch<1, max_rows(1)>(rv, w, n, n_lo, n_hi, inv, o, v, D, last); break;
      }
    }
  }
}

}  // namespace

void run_avx512(const Problem& p, int64_t row, int64_t t0, int64_t t1, int64_t kvh, float* scratch) {
  if (p.ctype == kF32) {
    if (p.qtype == kF32) return run_typed<float, float>(p, row, t0, t1, kvh, scratch);
    return run_typed<float, uint16_t>(p, row, t0, t1, kvh, scratch);
  }
  if (p.qtype == kF32) return run_typed<uint16_t, float>(p, row, t0, t1, kvh, scratch);
  run_typed<uint16_t, uint16_t>(p, row, t0, t1, kvh, scratch);
}

}  // namespace attention_kernels
}  // namespace layerskip
