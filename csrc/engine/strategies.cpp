// The decoding strategies over a group of rows: prefill, one autoregressive / early-exit step, one
// self-speculative round. Same semantics, stop rules and random counters per row as
// python/layerskip_ext/reference_generate.py. Host syncs are marked "host sync".
#include <algorithm>
#include <cmath>

#include "cpu/parallel.h"
#include "engine/engine.h"

namespace layerskip {
namespace engine {

namespace {

at::Tensor longs(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::kLong).to(device);  // [n] int64
}

void fail(RowState& s, const std::string& message) {
  s.finish_reason = "error";
  s.error = message;
}

}  // namespace

bool Engine::push(Row& r, int64_t id, int64_t token) {
  RowState& s = r.state;
  const RowParams& p = r.params;
  s.tokens.push_back(token);
  step_output_.push_back(id);
  step_output_.push_back(token);
  const auto& stop = p.stop_token_ids;
  if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
    s.finish_reason = "stop";
  } else if (static_cast<int64_t>(s.tokens.size()) >= p.max_new_tokens) {
    s.finish_reason = "length";
  } else if (s.prompt_length + static_cast<int64_t>(s.tokens.size()) >= p.context_length) {
    s.finish_reason = "context";
  }
  return s.finish_reason.has_value();
}

Engine::SamplingParams Engine::sampling_params(const std::vector<int64_t>& ids, const std::vector<int64_t>& counters) {
  const size_t n = ids.size();
  std::vector<double> temperature(n), top_p(n);
  std::vector<int64_t> top_k(n), seeds(n);
  for (size_t j = 0; j < n; ++j) {
    const RowParams& p = rows_.at(ids[j]).params;
    temperature[j] = p.temperature;
    top_p[j] = p.top_p;
    top_k[j] = p.top_k;
    seeds[j] = p.seed;
  }
  const at::Device device = weights_.device();
  return {at::tensor(temperature, at::kDouble).to(device), longs(top_k, device),
          at::tensor(top_p, at::kDouble).to(device), longs(seeds, device), longs(counters, device)};
}

at::Tensor Engine::finite_rows(at::Tensor& logits) {
  if (logits.is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous()) {
    // one pass over the rows instead of five ATen ops (a tiny model's step is short enough to notice them)
    const int64_t T = logits.size(0), V = logits.size(1);
    at::Tensor finite = at::empty({T}, at::kLong);  // [T]
    float* l = logits.data_ptr<float>();
    int64_t* f = finite.data_ptr<int64_t>();
    // rows in parallel once there are ~1M logits (a large verify pass); a decode step's rows run inline
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(V, 1));
    cpu::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* row = l + t * V;
        bool ok = true;
        for (int64_t v = 0; v < V; ++v) ok &= std::isfinite(row[v]);
        f[t] = ok;
        if (!ok) std::fill(row, row + V, 0.f);
      }
    });
    return finite;
  }
  const at::Tensor finite = at::isfinite(logits).all(1);  // [T] bool
  logits.masked_fill_(finite.logical_not().unsqueeze(1), 0.0);
  return finite.to(at::kLong);
}

// The prompts of `ids` (rows that use the same layers: all of them, or [0, E) for early exit) through those
// layers in one pass, T = the sum of their lengths, each token at its own (cache row, position); every row's
// first new token from its last position's logits. Each row's numbers are those of a prefill of its own
// (prefill_passes says when rows may share a pass).
void Engine::prefill(const std::vector<int64_t>& ids, int64_t layers) {
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> slots, positions, last(n), counters(n);
  std::vector<at::Tensor> prompts;
  int64_t T = 0;
  for (int64_t j = 0; j < n; ++j) {
    const RowState& s = rows_.at(ids[j]).state;
    for (int64_t i = 0; i < s.prompt_length; ++i) {
      slots.push_back(s.slot);
      positions.push_back(i);
    }
    prompts.push_back(s.prompt);
    T += s.prompt_length;
    last[j] = T - 1;
    counters[j] = s.counter;
  }
  const at::Device device = weights_.device();
  at::Tensor x = buffers_.scratch("prefill_x", {T, config_.shape.hidden});  // [T, H]
  embed(x, n == 1 ? prompts[0] : at::cat(prompts));
  run_layers(x, 0, layers, longs(slots, device), longs(positions, device), /*batch_invariant=*/false);
  at::Tensor logits = exit_logits(x.index_select(0, longs(last, device)), "logits", true);  // [n, V]
  const at::Tensor finite = finite_rows(logits);                                            // [n]
  const SamplingParams sp = sampling_params(ids, counters);
  at::Tensor tokens = buffers_.scratch("tokens", {n}, at::kLong);
  {
    Profiler::Scope scope(profiler_, Cat::sampling);
    ops_.sample.call(tokens, logits, sp.temperature, sp.top_k, sp.top_p, sp.seeds, sp.counters);
  }
  // host sync: the first tokens and whether their logits were finite, once per pass
  const at::Tensor host = at::cat({tokens, finite}).to(at::kCPU);  // [2n]
  const int64_t* out = host.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    Row& r = rows_.at(ids[j]);
    RowState& s = r.state;
    s.counter += 1;
    s.position = s.prompt_length;
    s.prefilled = true;
    if (out[n + j] == 0) {
      fail(s, "non-finite logits in the prefill");
      continue;
    }
    push(r, ids[j], out[j]);
  }
}

// One token per row through layers [0, E) (E = L for autoregressive and for self-speculative rows whose
// drafting is off), the final norm and the LM head.
void Engine::decode_group(const std::vector<int64_t>& ids, int64_t E) {
  if (decode_group_graph(ids, E)) return;
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> last(n), slots(n), positions(n), counters(n);
  for (int64_t j = 0; j < n; ++j) {
    const RowState& s = rows_.at(ids[j]).state;
    last[j] = s.tokens.back();
    slots[j] = s.slot;
    positions[j] = s.position;
    counters[j] = s.counter;
  }
  const at::Device device = weights_.device();
  at::Tensor x = buffers_.scratch("step_x", {n, config_.shape.hidden});  // [n, H]
  embed(x, longs(last, device));
  run_layers(x, 0, E, longs(slots, device), longs(positions, device), true);
  at::Tensor logits = exit_logits(x, "logits", true);  // [n, V]
  const at::Tensor finite = finite_rows(logits);      // [n]
  const SamplingParams sp = sampling_params(ids, counters);
  at::Tensor tokens = buffers_.scratch("tokens", {n}, at::kLong);
  {
    Profiler::Scope scope(profiler_, Cat::sampling);
    ops_.sample.call(tokens, logits, sp.temperature, sp.top_k, sp.top_p, sp.seeds, sp.counters);
  }
  // host sync: the new tokens and their logits' finiteness, once per step
  const at::Tensor host = at::cat({tokens, finite}).to(at::kCPU);  // [2n]
  finish_decode(ids, host.data_ptr<int64_t>());
}

void Engine::finish_decode(const std::vector<int64_t>& ids, const int64_t* out) {
  const int64_t n = static_cast<int64_t>(ids.size());
  for (int64_t j = 0; j < n; ++j) {
    Row& r = rows_.at(ids[j]);
    r.state.counter += 1;
    r.state.position += 1;
    draft_policy::after_plain_token(r.state.policy);
    if (out[n + j] == 0) {
      fail(r.state, "non-finite logits at position " + std::to_string(r.state.position - 1));
      continue;
    }
    if (out[j] < 0) {  // the CUDA kernels' error value: a draw from a row without probability mass
      fail(r.state, "sampling failed: a probability row without positive finite mass at position " +
                        std::to_string(r.state.position - 1));
      continue;
    }
    push(r, ids[j], out[j]);
  }
}

// Every row drafts d_j tokens through layers [0, E) (its policy's length, fewer when a draft's top probability
// falls below its threshold: draft_policy.h); layers [E, L) verify all rows' d_j + 1 positions in one pass from
// the exit-query cache; each row accepts its own prefix plus one token of the full model and rolls back by
// moving its position.
at::Tensor Engine::reduced_logits(const at::Tensor& x) {
  const int64_t T = x.size(0);
  at::Tensor normed = buffers_.scratch("normed", {T, config_.shape.hidden});
  at::Tensor logits = buffers_.scratch("draft_logits", {T, draft_vocab_.size(0)});
  Profiler::Scope s(profiler_, Cat::lm_head);
  ops_.rms_norm.call(normed, x, weights_.final_norm, config_.shape.rms_norm_eps);  // [T, H]
  linear(logits, normed, draft_head_, true);                                      // [T, K]
  return logits;
}

void Engine::speculative_group(const std::vector<int64_t>& ids) {
  if (speculative_group_graph(ids)) return;
  const int64_t n = static_cast<int64_t>(ids.size());
  const ModelShape& shape = config_.shape;
  const int64_t L = shape.num_layers, H = shape.hidden, V = shape.vocab;
  const int64_t E = rows_.at(ids[0]).params.exit_layer;
  const bool reduced = rows_.at(ids[0]).params.reduced_head;  // drafts over the draft vocabulary's K tokens
  const int64_t Vd = reduced ? draft_vocab_.size(0) : V;
  const at::Device device = weights_.device();
  // per row: draft length d_j (the verify block [position, position + d_j] stays inside the row's capacity),
  // first counter c_j
  std::vector<int64_t> d(n), c(n), slots(n), pos(n), last(n);
  int64_t dmax = 0;
  bool all_greedy = true;
  for (int64_t j = 0; j < n; ++j) {
    const Row& r = rows_.at(ids[j]);
    const RowState& s = r.state;
    const int64_t remaining = r.params.max_new_tokens - static_cast<int64_t>(s.tokens.size());
    d[j] = std::max<int64_t>(0, std::min({s.policy.length, remaining, s.capacity - s.position - 1}));
    c[j] = s.counter;
    slots[j] = s.slot;
    pos[j] = s.position;
    last[j] = s.tokens.back();
    dmax = std::max(dmax, d[j]);
    all_greedy = all_greedy && r.params.temperature == 0.0;
  }
  const int64_t W = dmax + 1;  // exit-cache entries per row
  at::Tensor exit_cache = buffers_.scratch("exit_query_cache", {n * W, H});  // row j, step i at j * W + i
  at::Tensor drafts = buffers_.scratch("draft_tokens", {n, dmax}, at::kLong);
  at::Tensor draft_probs = all_greedy ? at::Tensor() : buffers_.scratch("draft_probs", {n, dmax, V});

  // 1. draft: step i runs the rows with d_j >= i (position pos_j + i); rows with d_j > i also sample a token.
  // The last step only stores the layer-E state of each row's last draft, for the verifier's bonus token. A row
  // whose draft at step i is below its threshold stops there: d_j = i (that state is its last one).
  std::vector<int64_t> active(n);
  for (int64_t j = 0; j < n; ++j) active[j] = j;
  at::Tensor inputs = longs(last, device);  // [T] input tokens of the active rows
  for (int64_t i = 0; i <= dmax; ++i) {
    const int64_t T = static_cast<int64_t>(active.size());
    std::vector<int64_t> rows_i(T), pos_i(T), cache_i(T), next, next_k, next_counters, next_ids;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t j = active[k];
      rows_i[k] = slots[j];
      pos_i[k] = pos[j] + i;
      cache_i[k] = j * W + i;
      if (d[j] > i) {
        next.push_back(j);
        next_k.push_back(k);
        next_counters.push_back(c[j] + i);
        next_ids.push_back(ids[j]);
      }
    }
    at::Tensor x = buffers_.scratch("draft_x", {T, H});  // [T, H]
    embed(x, inputs);
    run_layers(x, 0, E, longs(rows_i, device), longs(pos_i, device), true);
    exit_cache.index_copy_(0, longs(cache_i, device), x);
    if (next.empty()) break;
    const int64_t Tn = static_cast<int64_t>(next.size());
    const at::Tensor xs = Tn == T ? x : x.index_select(0, longs(next_k, device));  // [Tn, H]
    at::Tensor logits = reduced ? reduced_logits(xs) : exit_logits(xs, "draft_logits", true);  // [Tn, Vd]
    finite_rows(logits);  // a non-finite draft is only a bad guess: the verifier decides
    const SamplingParams sp = sampling_params(next_ids, next_counters);
    at::Tensor tokens = at::empty({Tn}, inputs.options());  // [Tn]: the next step's inputs
    std::vector<int64_t> draft_index(Tn);
    for (int64_t k = 0; k < Tn; ++k) draft_index[k] = next[k] * dmax + i;
    const at::Tensor draft_index_t = longs(draft_index, device);
    at::Tensor probs;  // [Tn, Vd] the draft distributions (sampled groups)
    {
      Profiler::Scope scope(profiler_, Cat::sampling);
      if (all_greedy) {
        ops_.sample.call(tokens, logits, sp.temperature, sp.top_k, sp.top_p, sp.seeds, sp.counters);
      } else {  // greedy rows get one-hot probabilities: the same token, and exact greedy acceptance below
        probs = buffers_.scratch("draft_step_probs", {Tn, Vd});
        ops_.sampling_probs.call(probs, logits, sp.temperature, sp.top_k, sp.top_p);
        ops_.sample_from_probs.call(tokens, probs, sp.seeds, sp.counters);
        at::Tensor full = probs;  // [Tn, V]: a reduced draft's distribution is zero outside its K tokens
        if (reduced) full = at::zeros({Tn, V}, probs.options()).index_copy_(1, draft_vocab_, probs);
        draft_probs.view({n * dmax, V}).index_copy_(0, draft_index_t, full);
      }
      if (reduced) tokens = draft_vocab_.index_select(0, tokens);  // positions in the draft vocabulary -> ids
    }
    drafts.view({n * dmax}).index_copy_(0, draft_index_t, tokens);
    // the threshold: rows whose draft is not confident enough end their round with i drafts
    bool any_threshold = false;
    for (int64_t j : next) any_threshold = any_threshold || rows_.at(ids[j]).params.policy.threshold > 0.0;
    if (any_threshold) {
      // top probability of the distribution each draft came from: softmax of the logits (greedy rows),
      // the filtered sampling distribution (sampled rows)
      at::Tensor confidence = at::softmax(logits, 1).amax(1);  // [Tn]
      if (!all_greedy) {
        const at::Tensor sampled = probs.amax(1);  // [Tn]
        std::vector<int64_t> is_sampled(Tn);
        for (int64_t k = 0; k < Tn; ++k) is_sampled[k] = rows_.at(ids[next[k]]).params.temperature > 0.0;
        confidence = at::where(longs(is_sampled, device).to(at::kBool), sampled, confidence);
      }
      // host sync: the drafts' confidence, once per draft step of a round with a threshold
      const at::Tensor host_conf = confidence.to(at::kDouble).to(at::kCPU);
      const double* conf = host_conf.data_ptr<double>();
      std::vector<int64_t> keep_k;
      std::vector<int64_t> kept;
      for (int64_t k = 0; k < Tn; ++k) {
        const int64_t j = next[k];
        if (draft_policy::keep_draft(rows_.at(ids[j]).params.policy, conf[k])) {
          keep_k.push_back(k);
          kept.push_back(j);
        } else {
          d[j] = i;
        }
      }
      if (kept.empty()) break;
      if (static_cast<int64_t>(kept.size()) < Tn) tokens = tokens.index_select(0, longs(keep_k, device));
      next = kept;
    }
    active = next;
    inputs = tokens;
  }

  // 2. verify: layers [E, L) over every row's d_j + 1 cached layer-E states in one pass
  std::vector<int64_t> v_cache, v_rows, v_pos, v_ids, v_counters;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k <= d[j]; ++k) {
      v_cache.push_back(j * W + k);
      v_rows.push_back(slots[j]);
      v_pos.push_back(pos[j] + k);
      v_ids.push_back(ids[j]);
      v_counters.push_back(c[j]);
    }
  }
  const int64_t Tv = static_cast<int64_t>(v_cache.size());
  const at::Tensor v_cache_t = longs(v_cache, device);
  at::Tensor h = buffers_.scratch("verify_x", {Tv, H});  // [Tv, H]
  at::index_select_out(h, exit_cache, 0, v_cache_t);
  run_layers(h, E, L, longs(v_rows, device), longs(v_pos, device), true);
  at::Tensor logits = exit_logits(h, "logits", true);  // [Tv, V]
  const at::Tensor finite = finite_rows(logits);      // [Tv]

  // 3. accept, per row, on [n, W, V] (row j's entries past d_j are not read)
  at::Tensor tokens = buffers_.scratch("accept_tokens", {n, W}, at::kLong);
  at::Tensor num_accepted = buffers_.scratch("num_accepted", {n}, at::kLong);
  const at::Tensor lengths = longs(d, device);
  auto padded = [&](const at::Tensor& packed) {  // [Tv, V] -> [n, W, V]
    if (Tv == n * W) return packed.view({n, W, V});
    at::Tensor out = buffers_.scratch("padded_target", {n * W, V});
    out.index_copy_(0, v_cache_t, packed);
    return out.view({n, W, V});
  };
  {
    Profiler::Scope scope(profiler_, Cat::accept);
    if (all_greedy) {
      ops_.speculative_accept_greedy.call(tokens, num_accepted, drafts, lengths, padded(logits));
    } else {
      const SamplingParams sp = sampling_params(v_ids, v_counters);
      at::Tensor probs = buffers_.scratch("target_probs", {Tv, V});
      ops_.sampling_probs.call(probs, logits, sp.temperature, sp.top_k, sp.top_p);
      std::vector<int64_t> accept_counters(n);
      for (int64_t j = 0; j < n; ++j) accept_counters[j] = c[j] + d[j];
      const SamplingParams rp = sampling_params(ids, accept_counters);
      ops_.speculative_accept.call(tokens, num_accepted, drafts, lengths, draft_probs, padded(probs), rp.seeds,
                                   rp.counters);
    }
  }
  // host sync: the accepted tokens, their counts and the logits' finiteness, once per round
  const at::Tensor host = at::cat({tokens.flatten(), num_accepted, finite}).to(at::kCPU);  // [n W + n + Tv]
  finish_round(ids, d, c, pos, W, host.data_ptr<int64_t>());
}

void Engine::finish_round(const std::vector<int64_t>& ids, const std::vector<int64_t>& d,
                          const std::vector<int64_t>& c, const std::vector<int64_t>& pos, int64_t W,
                          const int64_t* out) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t* accepted = out + n * W;
  const int64_t* finite_out = accepted + n;
  for (int64_t j = 0, v = 0; j < n; v += d[j] + 1, ++j) {
    Row& r = rows_.at(ids[j]);
    RowState& s = r.state;
    const int64_t a = accepted[j];
    TORCH_CHECK(a >= 0 && a <= d[j], "Engine: speculative acceptance returned ", a, " accepted of ", d[j], " drafts");
    s.rounds += 1;
    s.drafted += d[j];
    s.accepted += a;
    s.counter = c[j] + 3 * d[j] + 1;
    draft_policy::after_round(r.params.policy, s.policy, d[j], a);
    bool ok = true;
    for (int64_t k = 0; k <= d[j]; ++k) ok = ok && finite_out[v + k] != 0;
    if (!ok) {
      fail(s, "non-finite logits at positions " + std::to_string(pos[j]) + ".." + std::to_string(pos[j] + d[j]));
      continue;
    }
    for (int64_t k = 0; k <= a; ++k) {
      if (out[j * W + k] < 0) {  // the CUDA kernels' error value: a draw from a row without probability mass
        fail(s, "sampling failed: a probability row without positive finite mass at position " +
                    std::to_string(pos[j] + k));
        break;
      }
      if (push(r, ids[j], out[j * W + k])) break;
    }
    // 4. roll back: positions [pos, pos + a] hold accepted tokens; later cache slots are stale and get
    // overwritten before anything reads them
    s.position += a + 1;
  }
}

}  // namespace engine
}  // namespace layerskip
