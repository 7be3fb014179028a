// CPU kernels of the verification step of speculative decoding: speculative_accept_greedy (longest
// prefix of the draft matching the target argmax) and speculative_accept (rejection sampling, Leviathan
// et al. 2023 / Chen et al. 2023, whose output follows the target distribution exactly).
// Outputs: tokens [d+1] int64 (-1 past the last valid entry), num_accepted [] int64.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/categorical.h"
#include "cpu/op_checks.h"
#include "ops.h"
#include "random.h"

namespace layerskip {
namespace {

void check_draft_tokens(const char* op, const torch::Tensor& draft_tokens, int64_t vocab) {
  cpu::check_cpu(draft_tokens, op, "draft_tokens");
  cpu::check_dim(draft_tokens, 1, op, "draft_tokens [d]");
  cpu::check_long(draft_tokens, op, "draft_tokens");
  const auto d = draft_tokens.contiguous();
  const int64_t* x = d.data_ptr<int64_t>();
  for (int64_t i = 0; i < d.size(0); ++i) {
    TORCH_CHECK(x[i] >= 0 && x[i] < vocab, op, ": draft_tokens[", i, "] = ", x[i], " is outside the vocabulary [0, ",
                vocab, ")");
  }
}

// tokens [d+1] filled with -1 and num_accepted [] for a draft of length d.
std::tuple<torch::Tensor, torch::Tensor> empty_outputs(const torch::Tensor& like, int64_t d) {
  auto tokens = torch::full({d + 1}, -1, like.options().dtype(at::kLong));
  auto num_accepted = torch::zeros({}, like.options().dtype(at::kLong));
  return {tokens, num_accepted};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> speculative_accept_greedy_cpu(const torch::Tensor& draft_tokens,
                                                                       const torch::Tensor& target_logits) {
  const char* op = "speculative_accept_greedy";
  cpu::check_cpu(target_logits, op, "target_logits");
  cpu::check_dim(target_logits, 2, op, "target_logits [d+1, V]");
  cpu::check_float(target_logits, true, op, "target_logits");
  const int64_t vocab = target_logits.size(1);
  TORCH_CHECK(vocab > 0, op, ": target_logits must have a non-empty vocabulary dimension");
  check_draft_tokens(op, draft_tokens, vocab);
  const int64_t d = draft_tokens.size(0);
  TORCH_CHECK(target_logits.size(0) == d + 1, op, ": target_logits must have d + 1 = ", d + 1,
              " rows for a draft of d = ", d, " tokens, got shape ", target_logits.sizes());

  const auto draft = draft_tokens.contiguous();
  const auto logits = target_logits.to(at::kFloat).contiguous();  // a copy only for bfloat16
  const int64_t* x = draft.data_ptr<int64_t>();
  const float* z = logits.data_ptr<float>();
  auto [tokens, num_accepted] = empty_outputs(draft_tokens, d);
  int64_t* out = tokens.data_ptr<int64_t>();
  int64_t n = 0;
  for (;; ++n) {
    cpu::check_logits_row(z + n * vocab, vocab, op, n);
    const int64_t best = cpu::argmax(z + n * vocab, vocab);
    out[n] = best;
    if (n == d || x[n] != best) break;
  }
  num_accepted.fill_(n);
  return {tokens, num_accepted};
}

std::tuple<torch::Tensor, torch::Tensor> speculative_accept_cpu(const torch::Tensor& draft_tokens,
                                                                const torch::Tensor& draft_probs,
                                                                const torch::Tensor& target_probs, int64_t seed,
                                                                int64_t offset) {
  const char* op = "speculative_accept";
  cpu::check_cpu(draft_probs, op, "draft_probs");
  cpu::check_cpu(target_probs, op, "target_probs");
  cpu::check_dim(draft_probs, 2, op, "draft_probs [d, V]");
  cpu::check_dim(target_probs, 2, op, "target_probs [d+1, V]");
  cpu::check_float(draft_probs, false, op, "draft_probs");
  cpu::check_float(target_probs, false, op, "target_probs");
  const int64_t vocab = target_probs.size(1);
  TORCH_CHECK(vocab > 0, op, ": target_probs must have a non-empty vocabulary dimension");
  check_draft_tokens(op, draft_tokens, vocab);
  const int64_t d = draft_tokens.size(0);
  TORCH_CHECK(draft_probs.size(0) == d && draft_probs.size(1) == vocab, op, ": draft_probs must have shape [", d,
              ", ", vocab, "] (d = len(draft_tokens), V = target_probs.size(1)), got ", draft_probs.sizes());
  TORCH_CHECK(target_probs.size(0) == d + 1, op, ": target_probs must have d + 1 = ", d + 1,
              " rows for a draft of d = ", d, " tokens, got shape ", target_probs.sizes());
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);

  const auto draft = draft_tokens.contiguous();
  const auto q_all = draft_probs.contiguous();
  const auto p_all = target_probs.contiguous();
  const int64_t* x = draft.data_ptr<int64_t>();
  const float* q = q_all.data_ptr<float>();
  const float* p = p_all.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t base = static_cast<uint64_t>(offset);
  auto [tokens, num_accepted] = empty_outputs(draft_tokens, d);
  int64_t* out = tokens.data_ptr<int64_t>();

  // One draw from row p_row [V] (validated) with counter c.
  auto draw_from = [&](const float* p_row, const char* name, int64_t row, uint64_t c) {
    const double mass = cpu::row_mass(p_row, vocab, op, name, row);
    TORCH_CHECK(mass > 0.0 && std::isfinite(mass), op, ": ", name, " row ", row,
                " must have a positive finite sum, got ", mass);
    return cpu::invert_cdf(p_row, vocab, uniform_from_counter(s, c) * mass);
  };

  std::vector<float> residual(vocab);
  int64_t n = 0;
  for (; n < d; ++n) {
    const float* q_row = q + n * vocab;
    const float* p_row = p + n * vocab;
    const float qx = q_row[x[n]], px = p_row[x[n]];
    TORCH_CHECK(qx >= 0.0f && std::isfinite(qx), op, ": draft_probs[", n, ", ", x[n], "] must be finite and >= 0");
    TORCH_CHECK(px >= 0.0f && std::isfinite(px), op, ": target_probs[", n, ", ", x[n], "] must be finite and >= 0");
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
  if (n == d) out[d] = draw_from(p + d * vocab, "target_probs", d, base + 2 * d);
  num_accepted.fill_(n);
  return {tokens, num_accepted};
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("speculative_accept_greedy", &speculative_accept_greedy_cpu);
  m.impl("speculative_accept", &speculative_accept_cpu);
}

}  // namespace layerskip
