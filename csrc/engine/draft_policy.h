// The adaptive drafting policy of self-speculative decoding, written once (as csrc/random.h is for the random
// draws): the C++ engine includes this header and python/layerskip_ext/draft_policy.py mirrors it line for
// line, so that the engine and the reference make the same decisions, hence give the same tokens and the same
// drafted / accepted counts.
//
// Decisions depend only on token counts observed and on the draft's confidence, never on timing. Every
// quantity kept in the state is an integer (fixed point, 1.0 == kOne, truncating division of non-negative
// numbers), so C++ and Python agree bit for bit; the only floating-point comparison is the confidence test.
//
// A self-speculative row is in one of two modes.
//  * speculating: a round drafts up to `length` tokens (capped by the tokens left and the cache). Draft step i
//    computes the draft distribution of position p + i; when its top probability (greedy: softmax of the draft
//    logits; sampling: of the filtered distribution the draft token is drawn from) is below `threshold`, the
//    round stops with k = i drafts (that step's token is dropped; its layer-E state is the verifier's last
//    position, so stopping costs no extra pass). Then layers [E, L) verify k + 1 positions as usual.
//  * plain: one token per step through all L layers (the row joins the autoregressive step); after
//    `probe_interval` plain tokens the row speculates again (a probe round).
// After each round (k drafted, a accepted; adaptive rows only):
//    acceptance EMA  <- (3 * ema + x) / 4, where x = a * kOne / k (x = 0 when k == 0);
//    length          <- length + 1 (at most max_length) when k > 0 and a == k, else a + 1 when k > 0;
//    when drafting no longer pays (see pays()), the row turns plain for probe_interval tokens.
// Random counters (one per sampled token, per row): a round starting at counter c draws c + i for draft step
// i (also for the dropped step of a round stopped by the threshold: that draw is never used), the acceptance
// from c + k, then c <- c + 3k + 1 with k the drafts kept; a plain step draws c, then c <- c + 1.
// Output is the full model's in every case: greedy tokens are identical, sampling keeps rejection sampling.
#pragma once
#include <algorithm>
#include <cstdint>

namespace layerskip {
namespace draft_policy {

constexpr int64_t kOne = 1 << 16;        // fixed-point 1.0
constexpr int64_t kEmaKeep = 3;           // EMA weights: new = (kEmaKeep * old + x) / (kEmaKeep + 1)
constexpr int64_t kDefaultProbeInterval = 32;

struct Params {
  int64_t max_length = 1;        // num_speculations: the longest round
  double threshold = 0.0;        // stop drafting below this top probability (0: never)
  bool adaptive = false;         // adapt the length and switch drafting off when it does not pay
  int64_t draft_cost = 0;        // cost of a draft step / cost of a full decode step, fixed point
  int64_t probe_interval = kDefaultProbeInterval;  // plain tokens before the next probe round
};

struct State {
  int64_t length = 1;       // drafts of the next round
  int64_t acceptance = kOne;  // EMA of accepted / drafted per round, fixed point (starts optimistic)
  int64_t plain_left = 0;   // > 0: plain decoding for this many more tokens
};

inline State initial_state(const Params& p) {
  State s;
  s.length = p.max_length;
  return s;
}

inline bool speculating(const State& s) { return s.plain_left == 0; }

// True while draft step i's token is kept: its top probability reaches the threshold.
inline bool keep_draft(const Params& p, double top_probability) { return top_probability >= p.threshold; }

// Weights one decoder layer reads (q, k, v, o, gate, up, down, two norms): its cost unit.
inline int64_t layer_weights(int64_t hidden, int64_t q_size, int64_t kv_size, int64_t intermediate) {
  return hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * intermediate + 2 * hidden;
}

// Cost of a draft step (E layers + a head of draft_head_rows rows) over a full step (L layers + the whole
// head of vocab rows), fixed point. Memory-bound decoding: a step costs the weight bytes it reads.
inline int64_t draft_cost(int64_t exit_layer, int64_t num_layers, int64_t layer, int64_t hidden,
                          int64_t draft_head_rows, int64_t vocab) {
  const int64_t draft = exit_layer * layer + draft_head_rows * hidden + hidden;
  const int64_t full = num_layers * layer + vocab * hidden + hidden;
  return draft * kOne / full;
}

// Whether speculating pays at acceptance rate `acceptance` (fixed point): for some round length k in
// [1, max_length], the expected tokens of a round, 1 + a + ... + a^k, exceed its cost in full steps,
// 1 + k * draft_cost (k draft steps, and one verify pass that reads the rest of the model once).
inline bool pays(const Params& p, int64_t acceptance) {
  int64_t power = kOne, tokens = kOne;
  for (int64_t k = 1; k <= p.max_length; ++k) {
    power = power * acceptance / kOne;
    tokens += power;
    if (tokens > kOne + k * p.draft_cost) return true;
    if (power == 0) break;  // no later k can pay more than this one did
  }
  return false;
}

// After a round of k drafts of which a were accepted.
inline void after_round(const Params& p, State& s, int64_t k, int64_t a) {
  if (!p.adaptive) return;
  const int64_t x = k > 0 ? a * kOne / k : 0;
  s.acceptance = (kEmaKeep * s.acceptance + x) / (kEmaKeep + 1);
  if (k > 0) s.length = a == k ? std::min(s.length + 1, p.max_length) : std::min(a + 1, p.max_length);
  if (!pays(p, s.acceptance)) s.plain_left = p.probe_interval;
}

// After a plain decode step.
inline void after_plain_token(State& s) {
  if (s.plain_left > 0) --s.plain_left;
}

}  // namespace draft_policy
}  // namespace layerskip
