// CUDA kernels of sampling_probs, sample_from_probs, sample (argmax) and the speculative acceptance ops, with
// the semantics of csrc/cpu/sampling.cpp and csrc/cpu/speculative.cpp. One block per row.
//
// Top-k / top-p without sorting: the kept set is a prefix of the order of rank keys (index.h: rank_key), so it
// ends at one key, found by radix selection (8 passes of 8 bits over the 64-bit keys): by count for top-k, by
// probability mass for top-p. Inverse-CDF sampling: each thread sums a contiguous chunk of the row in float64,
// a block scan gives the chunk offsets, and the thread whose chunk holds the target walks it. Draws come from
// random.h with the same counters as the CPU ops, so a seeded generation gives the same tokens on both devices
// (up to rounding of float sums at a CDF boundary).
//
// Contents are not validated with a host synchronisation: a probability entry that is negative or not finite
// counts as 0, a row without positive mass samples -1, a draft token outside [0, V) is rejected, a logits row
// without a finite maximum gets all-zero probabilities (and so samples -1).
#include "cuda/common.cuh"
#include "cuda/index.h"
#include "sampling_rules.h"

namespace layerskip {
namespace cuda {
namespace {

constexpr int kThreads = 1024;

// ---- block primitives (blockDim.x == kThreads)

// Exclusive prefix sum over the block's threads (in thread order); *total gets the sum of all.
__device__ double block_exclusive_scan(double x, double* total) {
  __shared__ double warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = x;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double v = warp_totals[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += y;
    }
    warp_totals[lane] = v;  // inclusive over warps
  }
  __syncthreads();
  *total = warp_totals[31];
  return (warp > 0 ? warp_totals[warp - 1] : 0.0) + incl - x;
}

// Index of the first maximum of row[0, n) (values of type T); all threads get it. -1 (the GPU's error value)
// when the row holds a NaN or +inf or has no finite maximum, where the CPU ops raise (cpu::check_logits_row).
template <typename T>
__device__ int64_t block_argmax(const T* row, int64_t n) {
  __shared__ float s_val[32];
  __shared__ int64_t s_idx[32];
  float best = -INFINITY;
  int64_t idx = INT64_MAX;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(row[i]);
    bad |= isnan(v) || v == INFINITY;
    if (v > best || idx == INT64_MAX) best = v, idx = i;  // strided order: the first seen of equal values wins
  }
  bad = __syncthreads_or(bad);
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > best || (ov == best && oi < idx)) best = ov, idx = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) s_val[warp] = best, s_idx[warp] = idx;
  __syncthreads();
  best = -INFINITY, idx = INT64_MAX;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
    if (s_idx[w] != INT64_MAX && (s_val[w] > best || (s_val[w] == best && s_idx[w] < idx) || idx == INT64_MAX)) {
      best = s_val[w], idx = s_idx[w];
    }
  }
  if (bad || !(best > -INFINITY)) return -1;  // NaN / +inf entries, or every entry -inf
  return idx == INT64_MAX ? 0 : idx;
}

// Inverse-CDF draw from the row prob(i), i in [0, n) (entries read through valid_prob): the first index whose
// float64 running sum exceeds u * mass, the last index with positive mass when rounding leaves none, -1
// when the row has no positive finite mass. All threads get the result.
template <typename Prob>
__device__ int64_t block_sample(Prob prob, int64_t n, double u) {
  __shared__ unsigned long long s_found, s_last;
  if (threadIdx.x == 0) s_found = ~0ull, s_last = 0;
  const Range r = split_range(threadIdx.x, blockDim.x, n);
  double chunk = 0.0;
  int64_t last_positive = -1;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float p = prob(i);
    chunk += p;
    if (p > 0.f) last_positive = i;
  }
  double total;
  const double before = block_exclusive_scan(chunk, &total);  // contains a __syncthreads after the init
  if (!(total > 0.0) || isinf(total)) return -1;
  const double target = u * total;
  if (last_positive >= 0) atomicMax(&s_last, static_cast<unsigned long long>(last_positive));
  if (before <= target && target < before + chunk) {
    double cum = before;
    int64_t found = last_positive;  // rounding of the walk left the target at its end: the chunk's last token
    for (int64_t i = r.begin; i < r.end; ++i) {
      cum += prob(i);
      if (cum > target) {
        found = i;
        break;
      }
    }
    atomicMin(&s_found, static_cast<unsigned long long>(found));
  }
  __syncthreads();
  const int64_t result = s_found != ~0ull ? static_cast<int64_t>(s_found) : static_cast<int64_t>(s_last);
  __syncthreads();  // the shared slots may be reused by a later call
  return result;
}

struct RowProb {
  const float* p;
  __device__ float operator()(int64_t i) const { return valid_prob(p[i]); }
};
struct ResidualProb {  // max(0, p - q)
  const float* p;
  const float* q;
  __device__ float operator()(int64_t i) const { return fmaxf(valid_prob(p[i]) - valid_prob(q[i]), 0.0f); }
};

// ---- kernels

template <typename T>
__global__ void __launch_bounds__(kThreads) argmax_kernel(const T* __restrict__ logits, int64_t* tokens,
                                                          int64_t vocab) {
  const int64_t r = blockIdx.x;
  const int64_t idx = block_argmax(logits + r * vocab, vocab);
  if (threadIdx.x == 0) tokens[r] = idx;
}

// The key that ends the kept prefix among keys <= limit: by count (the k-th smallest, mass == nullptr) or by
// mass (the first whose running sum of e reaches target).
template <typename T>
__device__ uint64_t radix_select(const T* z, const float* e, int64_t vocab, uint64_t limit, bool by_mass,
                                 double target) {
  __shared__ double s_weight[kRadixBins];
  __shared__ uint64_t s_prefix;
  __shared__ double s_below;
  if (threadIdx.x == 0) s_prefix = 0, s_below = 0.0;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) s_weight[b] = 0.0;
    __syncthreads();
    const uint64_t prefix = s_prefix;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint64_t key = rank_key(to_float(z[i]), i);
      if (key <= limit && radix_matches(key, prefix, pass)) {
        atomicAdd(&s_weight[radix_digit(key, pass)], by_mass ? static_cast<double>(e[i]) : 1.0);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double below = s_below;
      const int b = radix_pick_bin(s_weight, &below, target);
      s_below = below;
      s_prefix = radix_set_digit(prefix, pass, b);
    }
    __syncthreads();
  }
  return s_prefix;
}

// Row r's filtering parameters; false when they are out of range (the CPU op raises; the row gets zeros).
__device__ bool row_filter(const FilterParams& f, int64_t r, double* temperature, int64_t* top_k, double* top_p) {
  *temperature = f.temperature != nullptr ? f.temperature[r] : f.temperature_all;
  *top_k = f.top_k != nullptr ? f.top_k[r] : f.top_k_all;
  *top_p = f.top_p != nullptr ? f.top_p[r] : f.top_p_all;
  return temperature_in_range(*temperature) && *top_k >= 0 && *top_p > 0.0 && *top_p <= 1.0;  // as the CPU op
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sampling_probs_kernel(const T* __restrict__ logits, float* __restrict__ probs, int64_t vocab, FilterParams f) {
  __shared__ float s_red[32];
  __shared__ double s_dred[32];
  const int64_t r = blockIdx.x;
  const T* z = logits + r * vocab;
  float* out = probs + r * vocab;
  double temperature, top_p;
  int64_t top_k;
  const bool valid = row_filter(f, r, &temperature, &top_k, &top_p);
  float local_max = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = to_float(z[i]);
    local_max = fmaxf(local_max, isnan(v) ? INFINITY : v);  // fmaxf drops NaN: count it as +inf (invalid row)
  }
  const float zmax = block_max(local_max, s_red);
  if (!valid || !isfinite(zmax)) {  // NaN or +inf entries, or no finite maximum: the CPU op raises
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] = 0.f;
    return;
  }
  if (temperature == 0.0) {  // greedy: one-hot of the first argmax
    const int64_t best = block_argmax(z, vocab);
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] = i == best ? 1.f : 0.f;
    return;
  }
  const float inv_t = 1.0f / static_cast<float>(temperature);
  float local_sum = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float e = expf((to_float(z[i]) - zmax) * inv_t);
    out[i] = e;  // e [V], written and re-read by the same thread
    local_sum += e;
  }
  const int64_t k = (top_k == 0 || top_k >= vocab) ? vocab : top_k;
  if (k == vocab && top_p >= 1.0) {
    const float inv_sum = 1.0f / block_sum(local_sum, s_red);
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] *= inv_sum;
    return;
  }
  __syncthreads();  // every e written before the selection reads them
  uint64_t limit = ~0ull;
  if (k < vocab) limit = radix_select(z, out, vocab, ~0ull, false, static_cast<double>(k));
  if (top_p < 1.0) {
    double mass_k = 0.0;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      if (rank_key(to_float(z[i]), i) <= limit) mass_k += out[i];
    }
    mass_k = block_sum(mass_k, s_dred);
    const uint64_t end = radix_select(z, out, vocab, limit, true, top_p * mass_k);
    limit = end < limit ? end : limit;
  }
  double mass = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    if (rank_key(to_float(z[i]), i) <= limit) mass += out[i];
  }
  const float inv_mass = static_cast<float>(1.0 / block_sum(mass, s_dred));
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    out[i] = rank_key(to_float(z[i]), i) <= limit ? out[i] * inv_mass : 0.f;
  }
}

__device__ __forceinline__ uint64_t row_seed(const DrawParams& r, int64_t row) {
  return static_cast<uint64_t>(r.seeds != nullptr ? r.seeds[row] : r.seed_all);
}

__global__ void __launch_bounds__(kThreads)
    sample_from_probs_kernel(const float* __restrict__ probs, int64_t* tokens, int64_t vocab, DrawParams d) {
  const int64_t r = blockIdx.x;
  const int64_t counter = d.counters != nullptr ? d.counters[r] : d.offset + r;
  const double u = uniform_from_counter(row_seed(d, r), static_cast<uint64_t>(counter));
  const int64_t token = block_sample(RowProb{probs + r * vocab}, vocab, u);
  if (threadIdx.x == 0) tokens[r] = token;
}

__device__ __forceinline__ int64_t draft_length(const int64_t* lengths, int64_t b, int64_t d) {
  if (lengths == nullptr) return d;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > d ? d : n);
}

// One thread per row b: n = longest prefix of draft[b] matching the argmax rows best[b]; tokens [B, d+1],
// num_accepted [B].
__global__ void accept_greedy_kernel(const int64_t* __restrict__ draft, const int64_t* __restrict__ lengths,
                                     const int64_t* __restrict__ best, int64_t batch, int64_t d, int64_t* tokens,
                                     int64_t* num_accepted) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t db = draft_length(lengths, b, d);
  const int64_t* x = draft + b * d;
  const int64_t* y = best + b * (d + 1);
  int64_t n = 0;
  while (n < db && x[n] == y[n]) ++n;
  for (int64_t i = 0; i <= d; ++i) tokens[b * (d + 1) + i] = i <= n ? y[i] : -1;
  num_accepted[b] = n;
}

// One block per row b.
__global__ void __launch_bounds__(kThreads)
    accept_kernel(const int64_t* __restrict__ draft, const int64_t* __restrict__ lengths, const float* __restrict__ q_all,
                  const float* __restrict__ p_all, int64_t d, int64_t vocab, DrawParams r, int64_t* tokens,
                  int64_t* num_accepted) {
  __shared__ int64_t s_n;
  const int64_t b = blockIdx.x;
  const int64_t db = draft_length(lengths, b, d);
  const int64_t* x = draft + b * d;
  const float* q = q_all + b * d * vocab;
  const float* p = p_all + b * (d + 1) * vocab;
  const uint64_t seed = row_seed(r, b);
  const int64_t offset = r.counters != nullptr ? r.counters[b] : r.offset;
  if (threadIdx.x == 0) {
    int64_t n = 0;
    for (; n < db; ++n) {
      const int64_t xn = x[n];
      if (xn < 0 || xn >= vocab) break;
      const double u = uniform_from_counter(seed, accept_counter(offset, n));
      if (!accept_draft(u, valid_prob(q[n * vocab + xn]), valid_prob(p[n * vocab + xn]))) break;
    }
    s_n = n;
  }
  __syncthreads();
  const int64_t n = s_n;
  int64_t last;
  if (n < db) {
    const double u = uniform_from_counter(seed, resample_counter(offset, n));
    last = block_sample(ResidualProb{p + n * vocab, q + n * vocab}, vocab, u);
    if (last < 0) last = block_sample(RowProb{p + n * vocab}, vocab, u);  // p == q: draw from p
  } else {
    last = block_sample(RowProb{p + db * vocab}, vocab, uniform_from_counter(seed, bonus_counter(offset, db)));
  }
  int64_t* out = tokens + b * (d + 1);
  for (int64_t i = threadIdx.x; i <= d; i += blockDim.x) out[i] = i < n ? x[i] : (i == n ? last : -1);
  if (threadIdx.x == 0) num_accepted[b] = n;
}

}  // namespace

cudaError_t sampling_probs(DType lt, const void* logits, float* probs, int64_t rows, int64_t vocab, FilterParams f,
                           cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(lt, [&](auto l_tag) {
    using T = decltype(l_tag);
    sampling_probs_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(static_cast<const T*>(logits),
                                                                                   probs, vocab, f);
    return launch_status();
  });
}

cudaError_t sample_from_probs(const float* probs, int64_t* tokens, int64_t rows, int64_t vocab, DrawParams r,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  sample_from_probs_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(probs, tokens, vocab, r);
  return launch_status();
}

cudaError_t argmax_rows(DType lt, const void* logits, int64_t* tokens, int64_t rows, int64_t vocab,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(lt, [&](auto l_tag) {
    using T = decltype(l_tag);
    argmax_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(static_cast<const T*>(logits), tokens,
                                                                           vocab);
    return launch_status();
  });
}

cudaError_t speculative_accept_greedy(DType lt, const int64_t* draft, const int64_t* draft_lengths,
                                      const void* target_logits, int64_t batch, int64_t d, int64_t vocab,
                                      int64_t* scratch, int64_t* tokens, int64_t* num_accepted, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cudaError_t err = argmax_rows(lt, target_logits, scratch, batch * (d + 1), vocab, stream);
  if (err != cudaSuccess) return err;
  const int threads = 128;
  accept_greedy_kernel<<<static_cast<unsigned>(ceil_div(batch, threads)), threads, 0, stream>>>(
      draft, draft_lengths, scratch, batch, d, tokens, num_accepted);
  return launch_status();
}

cudaError_t speculative_accept(const int64_t* draft, const int64_t* draft_lengths, const float* draft_probs,
                               const float* target_probs, int64_t batch, int64_t d, int64_t vocab, DrawParams r,
                               int64_t* tokens, int64_t* num_accepted, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 0x7fffffff) return cudaErrorInvalidConfiguration;
  accept_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(draft, draft_lengths, draft_probs,
                                                                      target_probs, d, vocab, r, tokens, num_accepted);
  return launch_status();
}

}  // namespace cuda
}  // namespace layerskip
