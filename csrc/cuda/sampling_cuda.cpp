// Torch glue of the CUDA sampling and speculative acceptance ops (kernels in sampling.cu). Arguments, shapes
// and dtypes are checked as on the CPU. Tensor contents are not checked (that would need a host
// synchronisation); what the kernels do instead: a probability entry that is negative or not finite counts
// as 0, a row without positive mass samples -1, a draft token outside [0, V) is rejected (never accepted), a
// logits row without a finite maximum gets all-zero probabilities. A token of -1 is the GPU's error value:
// the engine checks for it at its one synchronisation per round.
#include <cmath>
#include <tuple>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

void check_filter_args(const char* op, double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, op, ": temperature must be finite and >= 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, op, ": top_p must be in (0, 1] (1 disables it), got ", top_p);
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_cuda(logits, op, "logits");
  check_dim(logits, 2, op, "logits [T, V]");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= INT32_MAX, op,
              ": logits must have a vocabulary dimension in [1, 2^31), got ", logits.sizes());
}

at::Tensor filtered_probs(const char* op, const at::Tensor& logits, double temperature, int64_t top_k,
                             double top_p) {
  const auto x = logits.contiguous();
  auto probs = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  FilterParams f;
  f.temperature_all = temperature, f.top_k_all = top_k, f.top_p_all = top_p;
  check_launch(sampling_probs(dtype_of(x), x.data_ptr(), probs.data_ptr<float>(), x.size(0), x.size(1), f,
                              current_stream()),
               op);
  return probs;
}

at::Tensor sampling_probs_cuda(const at::Tensor& logits, double temperature, int64_t top_k, double top_p) {
  const char* op = "sampling_probs";
  check_logits(op, logits);
  check_filter_args(op, temperature, top_k, top_p);
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be > 0 (use sample for greedy decoding), got ", temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  return filtered_probs(op, logits, temperature, top_k, top_p);
}

at::Tensor draw(const char* op, const at::Tensor& probs, int64_t seed, int64_t offset) {
  auto tokens = at::empty({probs.size(0)}, probs.options().dtype(at::kLong));
  DrawParams r;
  r.seed_all = seed, r.offset = offset;
  check_launch(sample_from_probs(probs.data_ptr<float>(), tokens.data_ptr<int64_t>(), probs.size(0), probs.size(1), r,
                                 current_stream()),
               op);
  return tokens;
}

at::Tensor sample_from_probs_cuda(const at::Tensor& probs, int64_t seed, int64_t offset) {
  const char* op = "sample_from_probs";
  check_cuda(probs, op, "probs");
  check_dim(probs, 2, op, "probs [T, V]");
  check_float32(probs, op, "probs");
  TORCH_CHECK(probs.size(1) > 0, op, ": probs must have a non-empty vocabulary dimension, got ", probs.sizes());
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(probs.device());
  return draw(op, probs.contiguous(), seed, offset);
}

at::Tensor sample_cuda(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, int64_t seed,
                          int64_t offset) {
  const char* op = "sample";
  check_logits(op, logits);
  check_filter_args(op, temperature, top_k, top_p);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (temperature > 0.0) return draw(op, filtered_probs(op, logits, temperature, top_k, top_p), seed, offset);
  const auto x = logits.contiguous();
  auto tokens = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  check_launch(argmax_rows(dtype_of(x), x.data_ptr(), tokens.data_ptr<int64_t>(), x.size(0), x.size(1),
                           current_stream()),
               op);
  return tokens;
}

void check_draft_tokens(const char* op, const at::Tensor& draft_tokens, const at::Tensor& like) {
  check_same_device(draft_tokens, like, op, "draft_tokens");
  check_dim(draft_tokens, 1, op, "draft_tokens [d]");
  check_long(draft_tokens, op, "draft_tokens");
}

std::tuple<at::Tensor, at::Tensor> speculative_accept_greedy_cuda(const at::Tensor& draft_tokens,
                                                                        const at::Tensor& target_logits) {
  const char* op = "speculative_accept_greedy";
  check_cuda(target_logits, op, "target_logits");
  check_dim(target_logits, 2, op, "target_logits [d+1, V]");
  check_float(target_logits, op, "target_logits");
  const int64_t vocab = target_logits.size(1);
  TORCH_CHECK(vocab > 0, op, ": target_logits must have a non-empty vocabulary dimension");
  check_draft_tokens(op, draft_tokens, target_logits);
  const int64_t d = draft_tokens.size(0);
  TORCH_CHECK(target_logits.size(0) == d + 1, op, ": target_logits must have d + 1 = ", d + 1,
              " rows for a draft of d = ", d, " tokens, got shape ", target_logits.sizes());
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const auto draft = draft_tokens.contiguous();
  const auto logits = target_logits.contiguous();
  auto tokens = at::empty({d + 1}, draft.options());
  auto num_accepted = at::empty({}, draft.options());
  auto scratch = at::empty({d + 1}, draft.options());
  check_launch(speculative_accept_greedy(dtype_of(logits), draft.data_ptr<int64_t>(), nullptr, logits.data_ptr(), 1, d,
                                         vocab, scratch.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
                                         num_accepted.data_ptr<int64_t>(), current_stream()),
               op);
  return {tokens, num_accepted};
}

std::tuple<at::Tensor, at::Tensor> speculative_accept_cuda(const at::Tensor& draft_tokens,
                                                                 const at::Tensor& draft_probs,
                                                                 const at::Tensor& target_probs, int64_t seed,
                                                                 int64_t offset) {
  const char* op = "speculative_accept";
  check_cuda(target_probs, op, "target_probs");
  check_same_device(draft_probs, target_probs, op, "draft_probs");
  check_dim(draft_probs, 2, op, "draft_probs [d, V]");
  check_dim(target_probs, 2, op, "target_probs [d+1, V]");
  check_float32(draft_probs, op, "draft_probs");
  check_float32(target_probs, op, "target_probs");
  const int64_t vocab = target_probs.size(1);
  TORCH_CHECK(vocab > 0, op, ": target_probs must have a non-empty vocabulary dimension");
  check_draft_tokens(op, draft_tokens, target_probs);
  const int64_t d = draft_tokens.size(0);
  TORCH_CHECK(draft_probs.size(0) == d && draft_probs.size(1) == vocab, op, ": draft_probs must have shape [", d,
              ", ", vocab, "] (d = len(draft_tokens), V = target_probs.size(1)), got ", draft_probs.sizes());
  TORCH_CHECK(target_probs.size(0) == d + 1, op, ": target_probs must have d + 1 = ", d + 1,
              " rows for a draft of d = ", d, " tokens, got shape ", target_probs.sizes());
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  const auto draft = draft_tokens.contiguous();
  const auto q = draft_probs.contiguous();
  const auto p = target_probs.contiguous();
  auto tokens = at::empty({d + 1}, draft.options());
  auto num_accepted = at::empty({}, draft.options());
  DrawParams r;
  r.seed_all = seed, r.offset = offset;
  check_launch(speculative_accept(draft.data_ptr<int64_t>(), nullptr, q.data_ptr<float>(), p.data_ptr<float>(), 1, d,
                                  vocab, r, tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                                  current_stream()),
               op);
  return {tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) {
  m.impl("sampling_probs", &sampling_probs_cuda);
  m.impl("sample_from_probs", &sample_from_probs_cuda);
  m.impl("sample", &sample_cuda);
  m.impl("speculative_accept_greedy", &speculative_accept_greedy_cuda);
  m.impl("speculative_accept", &speculative_accept_cuda);
}

}  // namespace cuda
}  // namespace layerskip
