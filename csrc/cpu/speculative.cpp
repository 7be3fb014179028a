// CPU kernels of the verification step of speculative decoding for B rows at once:
// speculative_accept_greedy (longest prefix of each row's draft matching the target argmax) and
// speculative_accept (rejection sampling, Leviathan et al. 2023 / Chen et al. 2023, whose output follows the
// target distribution exactly). Row b uses its first d_b = draft_lengths[b] drafts of the padded [B, d] input.
// Outputs: tokens [B, d + 1] int64 (-1 past each row's last valid entry), num_accepted [B] int64.
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/categorical.h"
#include "cpu/dtype_dispatch.h"
#include "cpu/op_checks.h"
#include "ops.h"
#include "random.h"

namespace layerskip {
namespace {

// Checks draft_tokens [B, d] int64 (the first d_b of row b in [0, V)), draft_lengths [B] in [0, d], and the
// outputs tokens [B, d + 1], num_accepted [B]. Returns (B, d).
std::pair<int64_t, int64_t> check_drafts(const char* op, const torch::Tensor& tokens,
                                         const torch::Tensor& num_accepted, const torch::Tensor& draft_tokens,
                                         const torch::Tensor& draft_lengths, int64_t vocab) {
  cpu::check_cpu(draft_tokens, op, "draft_tokens");
  cpu::check_dim(draft_tokens, 2, op, "draft_tokens [B, d]");
  cpu::check_long(draft_tokens, op, "draft_tokens");
  const int64_t batch = draft_tokens.size(0), d = draft_tokens.size(1);
  cpu::check_vector(draft_lengths, batch, at::kLong, op, "draft_lengths");
  TORCH_CHECK(d < INT64_MAX, op, ": draft length overflows");
  cpu::check_indices(draft_lengths, d + 1, op, "draft_lengths", "d + 1 = draft_tokens.size(1) + 1");
  cpu::check_out(tokens, {batch, d + 1}, at::kLong, op, "tokens [B, d + 1]");
  cpu::check_out(num_accepted, {batch}, at::kLong, op, "num_accepted [B]");
  const auto x = draft_tokens.contiguous();
  const auto n = draft_lengths.contiguous();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < n.data_ptr<int64_t>()[b]; ++i) {
      const int64_t t = x.data_ptr<int64_t>()[b * d + i];
      TORCH_CHECK(t >= 0 && t < vocab, op, ": draft_tokens[", b, ", ", i, "] = ", t,
                  " is outside the vocabulary [0, ", vocab, ")");
    }
  }
  return {batch, d};
}

}  // namespace

void speculative_accept_greedy_cpu(torch::Tensor& tokens, torch::Tensor& num_accepted,
                                   const torch::Tensor& draft_tokens, const torch::Tensor& draft_lengths,
                                   const torch::Tensor& target_logits) {
  const char* op = "speculative_accept_greedy";
  cpu::check_cpu(target_logits, op, "target_logits");
  cpu::check_dim(target_logits, 3, op, "target_logits [B, d + 1, V]");
  cpu::check_float(target_logits, true, op, "target_logits");
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK(vocab > 0, op, ": target_logits must have a non-empty vocabulary dimension");
  const auto shape = check_drafts(op, tokens, num_accepted, draft_tokens, draft_lengths, vocab);
  const int64_t batch = shape.first, d = shape.second;
  TORCH_CHECK(target_logits.size(0) == batch && target_logits.size(1) == d + 1, op, ": target_logits must have shape [",
              batch, ", ", d + 1, ", V] for drafts ", draft_tokens.sizes(), ", got ", target_logits.sizes());

  const auto draft = draft_tokens.contiguous();
  const auto lengths = draft_lengths.contiguous();
  const auto logits = target_logits.contiguous();
  tokens.fill_(-1);
  int64_t* out = tokens.data_ptr<int64_t>();
  int64_t* accepted = num_accepted.data_ptr<int64_t>();
  cpu::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(vocab);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* x = draft.data_ptr<int64_t>() + b * d;
      const int64_t db = lengths.data_ptr<int64_t>()[b];
      int64_t n = 0;
      for (;; ++n) {
        cpu::dispatch_float(logits.scalar_type(), [&](auto* tag) {
          using T = cpu::elem_t<decltype(tag)>;
          const T* row = logits.data_ptr<T>() + (b * (d + 1) + n) * vocab;
          for (int64_t i = 0; i < vocab; ++i) z[i] = cpu::to_float(row[i]);
        });
        cpu::check_logits_row(z.data(), vocab, op, b * (d + 1) + n);  // NaN / +inf: a broken model, an error
        const int64_t best = cpu::argmax(z.data(), vocab);
        out[b * (d + 1) + n] = best;
        if (n == db || x[n] != best) break;
      }
      accepted[b] = n;
    }
  });
}

void speculative_accept_cpu(torch::Tensor& tokens, torch::Tensor& num_accepted, const torch::Tensor& draft_tokens,
                            const torch::Tensor& draft_lengths, const torch::Tensor& draft_probs,
                            const torch::Tensor& target_probs, const torch::Tensor& seeds,
                            const torch::Tensor& counters) {
  const char* op = "speculative_accept";
  cpu::check_cpu(draft_probs, op, "draft_probs");
  cpu::check_cpu(target_probs, op, "target_probs");
  cpu::check_dim(draft_probs, 3, op, "draft_probs [B, d, V]");
  cpu::check_dim(target_probs, 3, op, "target_probs [B, d + 1, V]");
  cpu::check_float(draft_probs, false, op, "draft_probs");
  cpu::check_float(target_probs, false, op, "target_probs");
  const int64_t vocab = target_probs.size(2);
  TORCH_CHECK(vocab > 0, op, ": target_probs must have a non-empty vocabulary dimension");
  const auto shape = check_drafts(op, tokens, num_accepted, draft_tokens, draft_lengths, vocab);
  const int64_t batch = shape.first, d = shape.second;
  TORCH_CHECK(draft_probs.size(0) == batch && draft_probs.size(1) == d && draft_probs.size(2) == vocab, op,
              ": draft_probs must have shape [", batch, ", ", d, ", ", vocab, "], got ", draft_probs.sizes());
  TORCH_CHECK(target_probs.size(0) == batch && target_probs.size(1) == d + 1, op, ": target_probs must have shape [",
              batch, ", ", d + 1, ", V], got ", target_probs.sizes());
  cpu::check_vector(seeds, batch, at::kLong, op, "seeds");
  cpu::check_vector(counters, batch, at::kLong, op, "counters");
  cpu::check_indices(counters, INT64_MAX, op, "counters", "counters must be >= 0");

  const auto draft = draft_tokens.contiguous();
  const auto lengths = draft_lengths.contiguous();
  const auto q_all = draft_probs.contiguous();
  const auto p_all = target_probs.contiguous();
  const auto seed_c = seeds.contiguous(), counter_c = counters.contiguous();
  tokens.fill_(-1);
  int64_t* out_all = tokens.data_ptr<int64_t>();
  int64_t* accepted = num_accepted.data_ptr<int64_t>();

  cpu::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> residual(vocab);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* x = draft.data_ptr<int64_t>() + b * d;
      const int64_t db = lengths.data_ptr<int64_t>()[b];
      const float* q = q_all.data_ptr<float>() + b * d * vocab;
      const float* p = p_all.data_ptr<float>() + b * (d + 1) * vocab;
      const uint64_t s = static_cast<uint64_t>(seed_c.data_ptr<int64_t>()[b]);
      const uint64_t base = static_cast<uint64_t>(counter_c.data_ptr<int64_t>()[b]);
      int64_t* out = out_all + b * (d + 1);
      // One draw from row p_row [V] (validated) with counter c.
      auto draw_from = [&](const float* p_row, const char* name, int64_t row, uint64_t c) {
        const double mass = cpu::row_mass(p_row, vocab, op, name, row);
        TORCH_CHECK(mass > 0.0 && std::isfinite(mass), op, ": ", name, " row ", row,
                    " must have a positive finite sum, got ", mass);
        return cpu::invert_cdf(p_row, vocab, uniform_from_counter(s, c) * mass);
      };
      int64_t n = 0;
      for (; n < db; ++n) {
        const float* q_row = q + n * vocab;
        const float* p_row = p + n * vocab;
        const float qx = q_row[x[n]], px = p_row[x[n]];
        TORCH_CHECK(qx >= 0.0f && std::isfinite(qx), op, ": draft_probs[", b, ", ", n, ", ", x[n],
                    "] must be finite and >= 0");
        TORCH_CHECK(px >= 0.0f && std::isfinite(px), op, ": target_probs[", b, ", ", n, ", ", x[n],
                    "] must be finite and >= 0");
        const double u = uniform_from_counter(s, base + 2 * n);
        if (u * qx < px) {  // accept with probability min(1, p(x) / q(x))
          out[n] = x[n];
          continue;
        }
        // Rejected: draw from max(0, p - q) renormalised, or from p when that is all zero.
        cpu::row_mass(q_row, vocab, op, "draft_probs", n);  // validates both rows
        cpu::row_mass(p_row, vocab, op, "target_probs", n);
        for (int64_t i = 0; i < vocab; ++i) residual[i] = std::max(p_row[i] - q_row[i], 0.0f);
        const double mass = cpu::row_mass(residual.data(), vocab, op, "target_probs - draft_probs", n);
        if (mass > 0.0) {
          out[n] = cpu::invert_cdf(residual.data(), vocab, uniform_from_counter(s, base + 2 * n + 1) * mass);
        } else {
          out[n] = draw_from(p_row, "target_probs", n, base + 2 * n + 1);
        }
        break;
      }
      if (n == db) out[db] = draw_from(p + db * vocab, "target_probs", db, base + 2 * db);
      accepted[b] = n;
    }
  });
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("speculative_accept_greedy", &speculative_accept_greedy_cpu);
  m.impl("speculative_accept", &speculative_accept_cpu);
}

}  // namespace layerskip
