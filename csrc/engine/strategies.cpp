// The decoding strategies: prefill, one autoregressive / early-exit step, one self-speculative round.
// Same semantics, stop rules and random counters as python/layerskip_ext/reference_generate.py.
#include <algorithm>

#include "engine/engine.h"

namespace layerskip {
namespace engine {

bool Engine::push(int64_t token) {
  gen_.tokens.push_back(token);
  step_tokens_.push_back(token);
  const auto& stop = gen_.stop_token_ids;
  if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
    gen_.finish_reason = "stop";
  } else if (static_cast<int64_t>(gen_.tokens.size()) >= gen_.max_new_tokens) {
    gen_.finish_reason = "length";
  } else if (gen_.prompt_length + static_cast<int64_t>(gen_.tokens.size()) >= gen_.context_length) {
    gen_.finish_reason = "context";
  }
  return gen_.finish_reason.has_value();
}

// The prompt through the layers the strategy uses (all of them, except early exit: [0, E)); the first
// new token from the last row's logits.
void Engine::prefill() {
  const int64_t P = gen_.prompt_length, L = shape_.num_layers;
  const int64_t layers = gen_.strategy == Strategy::early_exit ? gen_.exit_layer : L;
  at::Tensor x = at::empty({P, shape_.hidden}, buffers_.residual.options());  // [P, H]
  embed(x, gen_.prompt);
  run_layers(x, 0, layers, 0);
  at::Tensor token = pick(exit_logits(x.narrow(0, P - 1, 1)));  // [1]
  buffers_.last_token.copy_(token);
  // host sync: the first new token, to check the stop rules
  const int64_t t = token.item<int64_t>();
  gen_.position = P;
  push(t);
}

// One token through layers [0, E) (E = L for autoregressive), the final norm and the LM head.
void Engine::decode_step() {
  const int64_t E = gen_.strategy == Strategy::early_exit ? gen_.exit_layer : shape_.num_layers;
  at::Tensor& x = buffers_.residual;  // [1, H]
  embed(x, buffers_.last_token);
  run_layers(x, 0, E, gen_.position);
  at::Tensor token = pick(exit_logits(x));  // [1]
  buffers_.last_token.copy_(token);
  // host sync: the new token, to check the stop rules
  const int64_t t = token.item<int64_t>();
  gen_.position += 1;
  push(t);
}

// Draft d tokens through layers [0, E), verify them through [E, L) in one pass from the exit-query
// cache, accept a prefix plus one token of the full model, roll back by moving the position.
void Engine::speculative_round() {
  Generation& g = gen_;
  const int64_t L = shape_.num_layers, E = g.exit_layer;
  const int64_t remaining = g.max_new_tokens - static_cast<int64_t>(g.tokens.size());
  // the verify block covers positions [position, position + d]: keep it inside this call's capacity
  const int64_t d = std::max<int64_t>(0, std::min({g.num_speculations, remaining, g.capacity - g.position - 1}));
  const int64_t c = g.counter;
  at::Tensor& exit_cache = buffers_.exit_query_cache;  // [d_max + 1, H]

  // 1. draft: token i + 1 from the layer-E state of position + i, kept in exit_cache[i]
  for (int64_t i = 0; i <= d; ++i) {
    at::Tensor x = exit_cache.narrow(0, i, 1);  // [1, H]
    embed(x, i == 0 ? buffers_.last_token : buffers_.draft_tokens.narrow(0, i - 1, 1));
    run_layers(x, 0, E, g.position + i);
    if (i == d) break;  // the last draft token only needs its layer-E state, for the verifier's bonus token
    at::Tensor logits = exit_logits(x);  // [1, V]
    Profiler::Scope s(profiler_, Cat::sampling);
    at::Tensor token;
    if (g.greedy()) {
      token = ops_.sample.call(logits, 0.0, 0, 1.0, g.seed, c + i);  // argmax
    } else {
      at::Tensor probs = ops_.sampling_probs.call(logits, g.temperature, g.top_k, g.top_p);  // [1, V]
      buffers_.draft_probs.narrow(0, i, 1).copy_(probs);
      token = ops_.sample_from_probs.call(probs, g.seed, c + i);
    }
    buffers_.draft_tokens.narrow(0, i, 1).copy_(token);
  }

  // 2. verify: layers [E, L) over the d + 1 cached layer-E states in one pass
  at::Tensor h = exit_cache.narrow(0, 0, d + 1);  // [d + 1, H]
  run_layers(h, E, L, g.position);
  at::Tensor target_logits = exit_logits(h);  // [d + 1, V]

  // 3. accept
  at::Tensor tokens, num_accepted;
  {
    Profiler::Scope s(profiler_, Cat::accept);
    const at::Tensor drafts = buffers_.draft_tokens.narrow(0, 0, d);  // [d]
    if (g.greedy()) {
      std::tie(tokens, num_accepted) = ops_.speculative_accept_greedy.call(drafts, target_logits);
    } else {
      at::Tensor target_probs = ops_.sampling_probs.call(target_logits, g.temperature, g.top_k, g.top_p);
      std::tie(tokens, num_accepted) = ops_.speculative_accept.call(drafts, buffers_.draft_probs.narrow(0, 0, d),
                                                                    target_probs, g.seed, c + d);
    }
  }
  // host sync: the accepted tokens and their count, once per round
  const at::Tensor host = at::cat({tokens, num_accepted.view({1})}).to(at::kCPU);  // [d + 2]
  const int64_t* out = host.data_ptr<int64_t>();
  const int64_t n = out[d + 1];
  TORCH_CHECK(n >= 0 && n <= d, "Engine: speculative acceptance returned ", n, " accepted of ", d, " drafts");
  buffers_.last_token.fill_(out[n]);

  g.rounds += 1;
  g.drafted += d;
  g.accepted += n;
  g.counter = c + 3 * d + 1;
  for (int64_t i = 0; i <= n; ++i) {
    if (push(out[i])) break;
  }
  // 4. roll back: positions [position, position + n] hold accepted tokens; later cache slots are stale
  // and get overwritten before anything reads them
  g.position += n + 1;
}

}  // namespace engine
}  // namespace layerskip
