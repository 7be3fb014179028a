// Torch glue of the CUDA sampling and speculative acceptance ops (kernels in sampling.cu). Arguments, shapes and
// dtypes are checked as on the CPU. Tensor contents (per-row parameters, probabilities, draft tokens) are not
// checked, since that would need a host synchronisation; what the kernels do instead: a row whose temperature,
// top_k or top_p is out of range, or whose logits have no finite maximum, gets all-zero probabilities; a
// probability entry that is negative or not finite counts as 0 and a row without positive mass samples -1; a
// draft token outside [0, V) is rejected (never accepted). A token of -1 is the GPU's error value, which the
// engine checks at its one synchronisation per round.
#include <tuple>

#include "cuda/glue.h"

namespace layerskip {
namespace cuda {
namespace {

void check_logits(const char* op, const at::Tensor& logits) {
  check_cuda(logits, op, "logits");
  check_dim(logits, 2, op, "logits [T, V]");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= INT32_MAX, op,
              ": logits must have a vocabulary dimension in [1, 2^31), got ", logits.sizes());
}

// Per-token filtering parameters [T] on the logits' device -> FilterParams over contiguous copies (kept alive by
// `keep`).
FilterParams filter_params(const char* op, const at::Tensor& like, int64_t rows, const at::Tensor& temperature,
                           const at::Tensor& top_k, const at::Tensor& top_p, std::vector<at::Tensor>& keep) {
  check_vector(temperature, like, rows, at::kDouble, op, "temperature");
  check_vector(top_k, like, rows, at::kLong, op, "top_k");
  check_vector(top_p, like, rows, at::kDouble, op, "top_p");
  keep = {temperature.contiguous(), top_k.contiguous(), top_p.contiguous()};
  FilterParams f;
  f.temperature = keep[0].data_ptr<double>();
  f.top_k = keep[1].data_ptr<int64_t>();
  f.top_p = keep[2].data_ptr<double>();
  return f;
}

DrawParams draw_params(const char* op, const at::Tensor& like, int64_t rows, const at::Tensor& seeds,
                       const at::Tensor& counters, std::vector<at::Tensor>& keep) {
  check_vector(seeds, like, rows, at::kLong, op, "seeds");
  check_vector(counters, like, rows, at::kLong, op, "counters");
  keep = {seeds.contiguous(), counters.contiguous()};
  DrawParams r;
  r.seeds = keep[0].data_ptr<int64_t>();
  r.counters = keep[1].data_ptr<int64_t>();
  return r;
}

void sampling_probs_cuda(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                         const at::Tensor& top_k, const at::Tensor& top_p) {
  const char* op = "sampling_probs";
  check_logits(op, logits);
  check_out(out, logits, logits.sizes(), at::kFloat, op, "out");
  std::vector<at::Tensor> keep;
  const FilterParams f = filter_params(op, logits, logits.size(0), temperature, top_k, top_p, keep);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  check_launch(sampling_probs(dtype_of(x), x.data_ptr(), out.data_ptr<float>(), x.size(0), x.size(1), f,
                              current_stream()),
               op);
}

void sample_from_probs_cuda(at::Tensor& out, const at::Tensor& probs, const at::Tensor& seeds,
                            const at::Tensor& counters) {
  const char* op = "sample_from_probs";
  check_cuda(probs, op, "probs");
  check_dim(probs, 2, op, "probs [T, V]");
  check_float32(probs, op, "probs");
  TORCH_CHECK(probs.size(1) > 0, op, ": probs must have a non-empty vocabulary dimension, got ", probs.sizes());
  check_out(out, probs, {probs.size(0)}, at::kLong, op, "out");
  std::vector<at::Tensor> keep;
  const DrawParams r = draw_params(op, probs, probs.size(0), seeds, counters, keep);
  const c10::cuda::CUDAGuard guard(probs.device());
  const auto p = probs.contiguous();
  check_launch(sample_from_probs(p.data_ptr<float>(), out.data_ptr<int64_t>(), p.size(0), p.size(1), r,
                                 current_stream()),
               op);
}

// Greedy rows (temperature 0) get one-hot probabilities, whose draw is their argmax: one path for every row.
void sample_cuda(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& counters) {
  const char* op = "sample";
  check_logits(op, logits);
  check_out(out, logits, {logits.size(0)}, at::kLong, op, "out");
  std::vector<at::Tensor> keep_f, keep_r;
  const FilterParams f = filter_params(op, logits, logits.size(0), temperature, top_k, top_p, keep_f);
  const DrawParams r = draw_params(op, logits, logits.size(0), seeds, counters, keep_r);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  auto probs = at::empty(x.sizes(), x.options().dtype(at::kFloat));  // [T, V] scratch
  const cudaStream_t stream = current_stream();
  check_launch(sampling_probs(dtype_of(x), x.data_ptr(), probs.data_ptr<float>(), x.size(0), x.size(1), f, stream),
               op);
  check_launch(sample_from_probs(probs.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1), r, stream),
               op);
}

// Checks of the batched acceptance outputs and drafts; returns (B, d).
std::pair<int64_t, int64_t> check_accept_args(const char* op, const at::Tensor& tokens, const at::Tensor& num_accepted,
                                              const at::Tensor& draft_tokens, const at::Tensor& draft_lengths,
                                              const at::Tensor& like) {
  check_same_device(draft_tokens, like, op, "draft_tokens");
  check_dim(draft_tokens, 2, op, "draft_tokens [B, d]");
  check_long(draft_tokens, op, "draft_tokens");
  const int64_t batch = draft_tokens.size(0), d = draft_tokens.size(1);
  check_vector(draft_lengths, like, batch, at::kLong, op, "draft_lengths");
  check_out(tokens, like, {batch, d + 1}, at::kLong, op, "tokens");
  check_out(num_accepted, like, {batch}, at::kLong, op, "num_accepted");
  return {batch, d};
}

void speculative_accept_greedy_cuda(at::Tensor& tokens, at::Tensor& num_accepted, const at::Tensor& draft_tokens,
                                    const at::Tensor& draft_lengths, const at::Tensor& target_logits) {
  const char* op = "speculative_accept_greedy";
  check_cuda(target_logits, op, "target_logits");
  check_dim(target_logits, 3, op, "target_logits [B, d+1, V]");
  check_float(target_logits, op, "target_logits");
  const auto [batch, d] = check_accept_args(op, tokens, num_accepted, draft_tokens, draft_lengths, target_logits);
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK(vocab > 0, op, ": target_logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(target_logits.size(0) == batch && target_logits.size(1) == d + 1, op, ": target_logits must have shape [",
              batch, ", ", d + 1, ", V] for drafts ", draft_tokens.sizes(), ", got ", target_logits.sizes());
  const c10::cuda::CUDAGuard guard(target_logits.device());
  if (batch == 0) return;
  const auto draft = draft_tokens.contiguous();
  const auto lengths = draft_lengths.contiguous();
  const auto logits = target_logits.contiguous();
  auto scratch = at::empty({batch * (d + 1)}, draft.options());
  check_launch(speculative_accept_greedy(dtype_of(logits), draft.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                                         logits.data_ptr(), batch, d, vocab, scratch.data_ptr<int64_t>(),
                                         tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                                         current_stream()),
               op);
}

void speculative_accept_cuda(at::Tensor& tokens, at::Tensor& num_accepted, const at::Tensor& draft_tokens,
                             const at::Tensor& draft_lengths, const at::Tensor& draft_probs,
                             const at::Tensor& target_probs, const at::Tensor& seeds, const at::Tensor& counters) {
  const char* op = "speculative_accept";
  check_cuda(target_probs, op, "target_probs");
  check_same_device(draft_probs, target_probs, op, "draft_probs");
  check_dim(draft_probs, 3, op, "draft_probs [B, d, V]");
  check_dim(target_probs, 3, op, "target_probs [B, d+1, V]");
  check_float32(draft_probs, op, "draft_probs");
  check_float32(target_probs, op, "target_probs");
  const auto [batch, d] = check_accept_args(op, tokens, num_accepted, draft_tokens, draft_lengths, target_probs);
  const int64_t vocab = target_probs.size(2);
  TORCH_CHECK(vocab > 0, op, ": target_probs must have a non-empty vocabulary dimension");
  TORCH_CHECK(draft_probs.size(0) == batch && draft_probs.size(1) == d && draft_probs.size(2) == vocab, op,
              ": draft_probs must have shape [", batch, ", ", d, ", ", vocab, "], got ", draft_probs.sizes());
  TORCH_CHECK(target_probs.size(0) == batch && target_probs.size(1) == d + 1, op, ": target_probs must have shape [",
              batch, ", ", d + 1, ", V], got ", target_probs.sizes());
  std::vector<at::Tensor> keep;
  const DrawParams r = draw_params(op, target_probs, batch, seeds, counters, keep);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  if (batch == 0) return;
  const auto draft = draft_tokens.contiguous();
  const auto lengths = draft_lengths.contiguous();
  const auto q = draft_probs.contiguous();
  const auto p = target_probs.contiguous();
  check_launch(speculative_accept(draft.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), q.data_ptr<float>(),
                                  p.data_ptr<float>(), batch, d, vocab, r, tokens.data_ptr<int64_t>(),
                                  num_accepted.data_ptr<int64_t>(), current_stream()),
               op);
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
