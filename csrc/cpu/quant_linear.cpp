// layerskip::linear_quantized and layerskip::dequantize_rows on the CPU: matmuls and embedding lookups on
// packed GGUF blocks (Q8_0, Q4_0, Q4_1; layouts in quant_kernels.h), never widened in memory.
//
// linear_quantized: out [T, N] = input [T, K] @ W[N, K]^T. The input rows are quantized per block of 32 to
// int8 (scale max|x| / 127, as llama.cpp does: the block dot products are then exact int32 sums, 4 products
// per instruction lane, and the weights are never widened to float), by default in two levels (the
// rounding residual quantized again: int16-like accuracy for a second int8 dot product per block; see
// quant_kernels.h; "int8" keeps llama.cpp's one level); output rows N are split across threads, and each
// weight row is read from memory once for all T input rows (quant_kernel_simd.inc).
//
// The activation mode: LAYERSKIP_QUANT_ACTIVATIONS (read once) or layerskip::set_quant_activations,
// "int8x2" (default) or "int8".
//
// The kernel is chosen at run time from cpuid: avx512vnni > avx512 > avx2 > plain (the reference). The
// environment variable LAYERSKIP_QUANT_KERNEL (read once) or layerskip::set_quant_kernel forces one of
// those the CPU supports, so tests run every path the machine has.
#include "cpu/kernel_choice.h"
#include "cpu/parallel.h"
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/quant_interleave.h"
#include "cpu/quant_kernels.h"
#include "ops.h"

namespace layerskip {

namespace {

using quant::kBlock;

// Best first. __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
std::vector<cpu::KernelChoice<quant::RowsKernel>> all_kernels() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  return {{"avx512vnni", &quant::rows_avx512vnni, vnni},
          {"avx512", &quant::rows_avx512, avx512},
          {"avx2", &quant::rows_avx2, avx2},
          {"plain", &quant::rows_plain, true}};
}

cpu::KernelSelector<quant::RowsKernel>& selector() {
  static cpu::KernelSelector<quant::RowsKernel> s("quant", "LAYERSKIP_QUANT_KERNEL", all_kernels());
  return s;
}

const char* format_name(int64_t format) {
  switch (format) {
    case quant::kQ8_0: return "Q8_0";
    case quant::kQ4_0: return "Q4_0";
    case quant::kQ4_1: return "Q4_1";
    case quant::kInterleaved + quant::kQ8_0: return "Q8_0 interleaved";
    case quant::kInterleaved + quant::kQ4_0: return "Q4_0 interleaved";
    case quant::kInterleaved + quant::kQ4_1: return "Q4_1 interleaved";
    default: return "?";
  }
}

// A GGUF format we compute with, or its interleaved form (quant_interleave.h).
bool known_format(int64_t format) {
  const int64_t f = quant::base_format(format);
  return f == quant::kQ8_0 || f == quant::kQ4_0 || f == quant::kQ4_1;
}

// Checks packed against [out_features, in_features] in `format`; returns the bytes per row (of K values; an
// interleaved matrix holds whole groups of 16 rows).
int64_t check_packed(const char* op, const torch::Tensor& packed, int64_t format, int64_t out_features,
                     int64_t in_features) {
  TORCH_CHECK(packed.device().is_cpu(), op, ": expected a CPU tensor, got packed weights on ", packed.device());
  TORCH_CHECK(known_format(format), op, ": unsupported block format ", format, " (expected GGUF type ",
              int64_t{quant::kQ8_0}, " = Q8_0, ", int64_t{quant::kQ4_0}, " = Q4_0 or ", int64_t{quant::kQ4_1},
              " = Q4_1, or ", quant::kInterleaved, " + one of those: interleaved by interleave_quantized)");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed weights must be uint8 bytes, got ",
              packed.scalar_type());
  TORCH_CHECK(out_features >= 0 && in_features >= 0, op, ": negative shape [", out_features, ", ", in_features,
              "]");
  TORCH_CHECK(in_features % kBlock == 0, op, ": in_features ", in_features, " is not a multiple of the block size ",
              kBlock, " of ", format_name(format));
  const int64_t row_bytes = in_features / kBlock * quant::block_bytes(format);
  // The byte count, rows (whole groups of 16 when interleaved) times bytes per row, must not wrap int64 (an
  // empty tensor then passed for a matrix of 2^63 bytes, and the kernels read past it).
  constexpr int64_t kMaxDim = int64_t{1} << 40;
  const bool small = out_features <= kMaxDim && in_features <= kMaxDim;
  const int64_t rows = quant::is_interleaved(format) && small ? quant::interleaved_rows(out_features) : out_features;
  int64_t total = 0;
  TORCH_CHECK(small && !__builtin_mul_overflow(rows, row_bytes, &total), op, ": a [", out_features, ", ",
              in_features, "] ", format_name(format),
              " matrix is too large (at most 2^40 rows and columns, and a byte count within int64)");
  TORCH_CHECK(packed.numel() == total, op, ": packed weights hold ", packed.numel(), " bytes; a [", out_features,
              ", ", in_features, "] ", format_name(format), " matrix takes ", total, " (", row_bytes, " per row)");
  if (quant::is_interleaved(format)) {
    TORCH_CHECK(packed.dim() == 1, op, ": interleaved weights must be 1-D, got shape ", packed.sizes());
  } else {
    TORCH_CHECK(packed.dim() == 1 || (packed.dim() == 2 && packed.size(0) == out_features), op,
                ": packed weights must be 1-D or [out_features, bytes per row], got shape ", packed.sizes());
  }
  return row_bytes;
}

// Eight floats as one GCC vector (AVX or two SSE registers, whatever the build targets).
using Float8 = float __attribute__((vector_size(32)));
inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Float8 abs8(Float8 v) { return v < 0 ? -v : v; }
inline Float8 max8(Float8 a, Float8 b) { return a < b ? b : a; }  // std::max per lane

// x [T, K] float32 -> int8 codes, scales, float sums and code sums per block of 32 (see quant_kernels.h); with
// q2, scale2 and csum2 (two levels) also the residual's codes, scales and code sums.
void quantize_rows(const float* x, int64_t T, int64_t K, int8_t* q, float* scale, float* sum, float* qsum,
                   int32_t* csum, int8_t* q2, float* scale2, int32_t* csum2) {
  const int64_t nb = K / kBlock;
  for (int64_t i = 0; i < T * nb; ++i) {
    const float* v = x + i * kBlock;
    // max|v| and sum(v) per lane j % 8 over the block's four vectors of 8, then across lanes in a fixed tree:
    // vector code, and the same float sum on every machine (every kernel sees the same activations)
    Float8 lane_max = abs8(load8(v)), lane_sum = load8(v);
    for (int j = 8; j < kBlock; j += 8) {
      const Float8 w = load8(v + j);
      lane_max = max8(lane_max, abs8(w));
      lane_sum += w;
    }
    float m[8], t[8];
    std::memcpy(m, &lane_max, sizeof(m));
    std::memcpy(t, &lane_sum, sizeof(t));
    const float amax = std::max(std::max(std::max(m[0], m[4]), std::max(m[2], m[6])),
                                std::max(std::max(m[1], m[5]), std::max(m[3], m[7])));
    const float s = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
    if (!std::isfinite(s)) {
      // A NaN or infinity in the block (its sum is then not finite; max8 skips NaN): zero codes and a NaN scale,
      // so that every output of the row is NaN, as a float matmul's would be (not finite garbage from codes of
      // NaN, whose conversion to int8 is undefined), and the engine's check of the logits stops the row.
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::memset(q + i * kBlock, 0, kBlock);
      scale[i] = sum[i] = qsum[i] = nan;
      csum[i] = 0;
      if (q2 != nullptr) {
        std::memset(q2 + i * kBlock, 0, kBlock);
        scale2[i] = nan;
        csum2[i] = 0;
      }
      continue;
    }
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    // |residual| <= d / 2 = 128 d2 (127 after the clamp below, off by at most d2 in a tie). A power of two
    // apart, so that the interleaved kernels add the two levels' dot products exactly in int32: 256 dot(q) +
    // dot(q2) is the dot product with the int16-like code 256 q + q2 (quant_kernel_group.inc).
    const float d2 = d / 256.0f;
    const float inv2 = d2 > 0.0f ? 1.0f / d2 : 0.0f;
    // Rounded to nearest (ties to even): nearbyint compiles to one instruction, and these loops have no
    // calls or branches, so the compiler vectorizes them (lround was a libm call per value).
    int8_t* c = q + i * kBlock;
    int32_t codes = 0, codes2 = 0;
    for (int j = 0; j < kBlock; ++j) c[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
    for (int j = 0; j < kBlock; ++j) codes += c[j];
    if (q2 != nullptr) {
      int8_t* c2 = q2 + i * kBlock;
      for (int j = 0; j < kBlock; ++j) {
        const float r = std::nearbyint((v[j] - d * static_cast<float>(c[j])) * inv2);
        c2[j] = static_cast<int8_t>(std::min(std::max(r, -127.0f), 127.0f));  // vmaxps / vminps
      }
      for (int j = 0; j < kBlock; ++j) codes2 += c2[j];
    }
    scale[i] = d;
    sum[i] = s;
    qsum[i] = d * static_cast<float>(codes);
    csum[i] = codes;
    if (q2 != nullptr) {
      csum2[i] = codes2;
      scale2[i] = d2;
      qsum[i] += d2 * static_cast<float>(codes2);
    }
  }
}

// The activation mode: true for two levels.
std::atomic<int> g_two_levels{-1};  // -1: not read yet

bool parse_activations(const std::string& name) {
  if (name == "int8x2") return true;
  if (name == "int8") return false;
  TORCH_CHECK(false, "unknown quant activation mode '", name, "': expected int8x2 (two-level, accurate) or int8 ",
              "(one level, as llama.cpp)");
}

bool two_levels() {
  int v = g_two_levels.load(std::memory_order_acquire);
  if (v >= 0) return v == 1;
  const char* env = std::getenv("LAYERSKIP_QUANT_ACTIVATIONS");
  const int chosen = parse_activations(env != nullptr && *env != '\0' ? env : "int8x2") ? 1 : 0;
  int expected = -1;
  g_two_levels.compare_exchange_strong(expected, chosen);  // a set_quant_activations that came first wins
  return g_two_levels.load(std::memory_order_acquire) == 1;
}

}  // namespace

std::vector<std::string> quant_kernels_cpu() { return selector().supported_names(); }

std::string quant_kernel_cpu() { return selector().current()->name; }

void set_quant_kernel_cpu(const std::string& name) { selector().set(name); }

std::string quant_activations_cpu() { return two_levels() ? "int8x2" : "int8"; }

void set_quant_activations_cpu(const std::string& name) {
  g_two_levels.store(parse_activations(name) ? 1 : 0, std::memory_order_release);
}

torch::Tensor& linear_quantized_out_cpu(const torch::Tensor& input, const torch::Tensor& packed, int64_t format,
                                        int64_t out_features, int64_t in_features, torch::Tensor& out) {
  const int64_t row_bytes = check_packed("linear_quantized", packed, format, out_features, in_features);
  TORCH_CHECK(input.device().is_cpu(), "linear_quantized: expected a CPU input, got ", input.device());
  TORCH_CHECK(input.dim() == 2 && input.size(1) == in_features, "linear_quantized: input must be [T, ",
              in_features, "], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, "linear_quantized: input must be float32, got ",
              input.scalar_type());
  const int64_t T = input.size(0), N = out_features, K = in_features;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == T &&
                  out.size(1) == N && out.stride(1) == 1,
              "linear_quantized: out must be a float32 CPU tensor [", T, ", ", N,
              "] with contiguous rows, got ", out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  if (T == 0 || N == 0) return out;
  if (K == 0) return out.zero_();

  const torch::Tensor x = input.contiguous();  // [T, K]
  const torch::Tensor w = packed.contiguous();
  const int64_t nb = K / kBlock;
  const bool two = two_levels();
  // The quantized activations, in buffers kept per calling thread (a decode step makes ~4 calls per layer)
  thread_local std::vector<int8_t> q, q2;
  thread_local std::vector<float> scale, sum, qsum, scale2;
  thread_local std::vector<int32_t> csum, csum2;
  q.resize(static_cast<size_t>(T * K));
  q2.resize(two ? static_cast<size_t>(T * K) : 0);
  for (auto* v : {&scale, &sum, &qsum}) v->resize(static_cast<size_t>(T * nb));
  scale2.resize(two ? static_cast<size_t>(T * nb) : 0);
  csum.resize(static_cast<size_t>(T * nb));
  csum2.resize(two ? static_cast<size_t>(T * nb) : 0);
  quantize_rows(x.data_ptr<float>(), T, K, q.data(), scale.data(), sum.data(), qsum.data(), csum.data(),
                two ? q2.data() : nullptr, two ? scale2.data() : nullptr, two ? csum2.data() : nullptr);
  quant::QuantizedActivations acts{q.data(), scale.data(), sum.data(), qsum.data(), T, K};
  acts.codes = csum.data();
  if (two) {
    acts.q2 = q2.data();
    acts.scale2 = scale2.data();
    acts.codes2 = csum2.data();
  }

  const quant::RowsKernel fn = selector().current()->fn;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  // Threads split N into blocks of at least ~256 KiB of weights (as linear does), fewer bytes when many
  // input rows make each row costlier to compute.
  const int64_t work_per_row = row_bytes * (1 + (T - 1) / 8);
  if (quant::is_interleaved(format)) {
    // Whole groups of 16 rows per thread, at least ~32 KiB of weights each: the interleaved kernel computes
    // 16 rows per instruction, so a decode step's small matrices (a few hundred KiB) still split across threads
    // (with workers spinning between regions, a region costs a few microseconds).
    const int64_t groups = (N + quant::kGroup - 1) / quant::kGroup;
    const int64_t grain = std::max<int64_t>((int64_t{32} << 10) / std::max<int64_t>(work_per_row * quant::kGroup, 1), 1);
    cpu::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      fn(format, wp, row_bytes, g0 * quant::kGroup, std::min(g1 * quant::kGroup, N), acts, op, ldo);
    });
    return out;
  }
  const int64_t grain = std::max<int64_t>((int64_t{256} << 10) / std::max<int64_t>(work_per_row, 1), 1);
  cpu::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(format, wp, row_bytes, n0, n1, acts, op, ldo); });
  return out;
}

torch::Tensor linear_quantized_cpu(const torch::Tensor& input, const torch::Tensor& packed, int64_t format,
                                   int64_t out_features, int64_t in_features) {
  TORCH_CHECK(input.dim() == 2, "linear_quantized: input must be 2-D [T, K], got shape ", input.sizes());
  torch::Tensor out = torch::empty({input.size(0), out_features}, input.options().dtype(at::kFloat));
  return linear_quantized_out_cpu(input, packed, format, out_features, in_features, out);
}

torch::Tensor dequantize_rows_cpu(const torch::Tensor& packed, int64_t format, int64_t out_features,
                                  int64_t in_features, const torch::Tensor& ids) {
  const int64_t row_bytes = check_packed("dequantize_rows", packed, format, out_features, in_features);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
              "dequantize_rows: ids must be a 1-D int64 CPU tensor, got ", ids.scalar_type(), " ", ids.sizes());
  const torch::Tensor w = packed.contiguous();
  const torch::Tensor idx = ids.contiguous();
  const int64_t T = idx.size(0), K = in_features, nb = K / kBlock, bb = quant::block_bytes(format);
  const int64_t* id = idx.data_ptr<int64_t>();
  const bool il = quant::is_interleaved(format);
  const int64_t F = quant::base_format(format);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < out_features, "dequantize_rows: id ", id[t], " at position ", t,
                " is out of range [0, ", out_features, ")");
  }
  torch::Tensor out = torch::empty({T, K}, packed.options().dtype(at::kFloat));  // [T, K]
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  cpu::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> scratch(il ? static_cast<size_t>(row_bytes) : 0);  // a row out of the interleaved groups
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* row = wp + id[t] * row_bytes;
      if (il) {
        quant::move_row(format, K, id[t], const_cast<uint8_t*>(wp), scratch.data(), true);
        row = scratch.data();
      }
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        float* o = op + t * K + b * kBlock;
        const float d = quant::half_to_float(quant::load_u16(blk));
        if (F == quant::kQ8_0) {
          for (int i = 0; i < kBlock; ++i) o[i] = d * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
          continue;
        }
        const float m = F == quant::kQ4_1 ? quant::half_to_float(quant::load_u16(blk + 2)) : 0.0f;
        const uint8_t* qs = blk + (F == quant::kQ4_1 ? 4 : 2);
        const int offset = F == quant::kQ4_0 ? 8 : 0;
        for (int i = 0; i < kBlock / 2; ++i) {
          o[i] = d * static_cast<float>((qs[i] & 0x0f) - offset) + m;
          o[i + kBlock / 2] = d * static_cast<float>((qs[i] >> 4) - offset) + m;
        }
      }
    }
  });
  return out;
}

torch::Tensor interleave_quantized_cpu(const torch::Tensor& packed, int64_t format, int64_t out_features,
                                      int64_t in_features) {
  TORCH_CHECK(!quant::is_interleaved(format), "interleave_quantized: format ", format,
              " is already interleaved; pass the GGUF format (2 = Q4_0, 3 = Q4_1, 8 = Q8_0)");
  check_packed("interleave_quantized", packed, format, out_features, in_features);
  const torch::Tensor w = packed.contiguous();
  torch::Tensor out = torch::empty({quant::interleaved_bytes(format, out_features, in_features)},
                                   packed.options().dtype(at::kByte));
  quant::interleave(format, out_features, in_features, w.data_ptr<uint8_t>(), out.data_ptr<uint8_t>());
  return out;
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("interleave_quantized", &interleave_quantized_cpu);
  m.impl("linear_quantized", &linear_quantized_cpu);
  m.impl("linear_quantized.out", &linear_quantized_out_cpu);
  m.impl("dequantize_rows", &dequantize_rows_cpu);
}

// No tensor arguments: these dispatch to their CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(layerskip, CompositeImplicitAutograd, m) {
  m.impl("quant_kernels", &quant_kernels_cpu);
  m.impl("quant_kernel", &quant_kernel_cpu);
  m.impl("set_quant_kernel", &set_quant_kernel_cpu);
  m.impl("quant_activations", &quant_activations_cpu);
  m.impl("set_quant_activations", &set_quant_activations_cpu);
}

}  // namespace layerskip
