// CUDA graphs of the engine's steps (CUDA builds; elsewhere every step runs eagerly).
//
// A decode step of n rows through layers [0, E), and a whole self-speculative round of n rows that all draft d
// tokens (d draft steps through [0, E), the verify pass through [E, L) over the n (d + 1) exit states, the
// acceptance), are fixed sequences of launches once their inputs (each row's last token, cache row, position,
// random counter and sampling parameters) sit in device tensors: each is captured once per (E, n) or
// (E, d, n, greedy) and replayed. Per step or round the host then does one pinned host-to-device copy of the
// packed inputs, one graph launch and one device-to-host copy of the outputs (the round's one synchronisation).
// Rounds whose rows draft different d (near max_new_tokens or the context end) run eagerly.
//
// A captured graph holds addresses: of its own workspace (Buffers::use_workspace routes the step's scratch
// tensors to memory the graph owns), of its input / output tensors, of the weights (fixed) and of the KV cache,
// which Buffers::reserve may reallocate: a graph is recaptured when the cache generation it saw is gone. The
// first step of a shape runs eagerly (it warms up everything the capture must not initialise) and the second
// one captures. LAYERSKIP_CUDA_GRAPHS=0 in the environment, or Engine.set_cuda_graphs(False), turns graphs off.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>

#include "engine/engine.h"

#if defined(LAYERSKIP_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace layerskip {
namespace engine {

namespace {
bool graphs_enabled_by_env() {
  const char* v = std::getenv("LAYERSKIP_CUDA_GRAPHS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}
}  // namespace

#if defined(LAYERSKIP_WITH_CUDA)

struct Engine::GraphCache {
  // One captured step (a decode step or a speculative round) with its inputs and outputs.
  struct Decode {
    at::cuda::CUDAGraph graph;
    Buffers::Workspace workspace;       // the step's scratch tensors, owned by the graph
    at::Tensor host_long, host_double;  // pinned staging of the inputs
    at::Tensor in_long;    // [6n] int64: last tokens | cache rows | positions | counters | top_k | seeds
    at::Tensor in_double;  // [2n] float64: temperature | top_p
    at::Tensor out;        // int64, the step's host outputs (decode: tokens | finite; round: see finish_round)
    int64_t generation = -1;            // Buffers::generation() at capture
    bool captured = false;
    int64_t steps_seen = 0;
    int64_t last_used = 0;  // GraphCache::clock at the last step of this shape
  };
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Decode>> decode;  // by (E, n)
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::unique_ptr<Decode>> rounds;  // by (E, d, n, greedy)
  int64_t replays = 0;
  int64_t clock = 0;

  // Captured graphs kept at most (each holds its workspace and private memory pool: [n (d + 1), V] logits and
  // probabilities for a round; keys vary with n, and with d under adaptive drafting or near a row's end, so an
  // unbounded cache grows until the device runs out of memory). The least recently used one goes first.
  static constexpr size_t kMaxCaptured = 16;
  void evict_for_capture() {
    for (;;) {
      size_t captured = 0;
      std::unique_ptr<Decode>* oldest = nullptr;
      auto visit = [&](auto& map) {
        for (auto& item : map) {
          if (!item.second || !item.second->captured) continue;
          ++captured;
          if (oldest == nullptr || item.second->last_used < (*oldest)->last_used) oldest = &item.second;
        }
      };
      visit(decode);
      visit(rounds);
      if (captured < kMaxCaptured || oldest == nullptr) return;
      oldest->reset();  // the map keeps an empty slot: the shape starts again with one eager step
    }
  }

  // The step of `entry`'s shape, ready to capture or replay: recreated when the KV cache it captured has moved
  // (generation: Buffers::generation() now), stamped for eviction, room made before its capture; nullptr on the
  // shape's first step, which runs eagerly (it warms up what the capture must not initialise).
  Decode* entry_for(std::unique_ptr<Decode>& entry, int64_t generation) {
    if (entry && entry->captured && entry->generation != generation) entry.reset();
    if (!entry) entry = std::make_unique<Decode>();
    Decode& g = *entry;
    g.last_used = ++clock;
    if (!g.captured && g.steps_seen++ == 0) return nullptr;
    if (!g.captured) evict_for_capture();  // never this entry: it is not captured
    return &g;
  }

  // Pinned staging and device tensors of a graph's inputs ([longs] int64, [doubles] float64) and outputs.
  static void allocate_io(Decode& g, int64_t longs, int64_t doubles, int64_t outs, const at::Device& device) {
    const auto pinned = at::TensorOptions().pinned_memory(true);
    g.host_long = at::empty({longs}, pinned.dtype(at::kLong));
    g.host_double = at::empty({doubles}, pinned.dtype(at::kDouble));
    g.in_long = at::empty({longs}, at::TensorOptions().dtype(at::kLong).device(device));
    g.in_double = at::empty({doubles}, at::TensorOptions().dtype(at::kDouble).device(device));
    g.out = at::empty({outs}, at::TensorOptions().dtype(at::kLong).device(device));
  }

  // Stages the rows' inputs in g's pinned buffers, row j at offset j of each part: host_long [6n] last token |
  // cache row | position | random counter | top_k | seed; host_double [2n] temperature | top_p.
  static void stage_inputs(Decode& g, const std::map<int64_t, Row>& rows, const std::vector<int64_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    int64_t* hl = g.host_long.data_ptr<int64_t>();
    double* hd = g.host_double.data_ptr<double>();
    for (int64_t j = 0; j < n; ++j) {
      const Row& r = rows.at(ids[j]);
      hl[j] = r.state.tokens.back();
      hl[n + j] = r.state.slot;
      hl[2 * n + j] = r.state.position;
      hl[3 * n + j] = r.state.counter;
      hl[4 * n + j] = r.params.top_k;
      hl[5 * n + j] = r.params.seed;
      hd[j] = r.params.temperature;
      hd[n + j] = r.params.top_p;
    }
  }

  // Captures body() into g.graph on a side stream (the legacy default stream cannot capture), with the
  // engine's scratch tensors routed to the graph's own workspace. False when the capture failed: it is ended,
  // graphs are turned off for this engine with a warning naming the error, and the caller runs the step eagerly
  // (nothing ran while capturing, so no state changed; an error of the step itself recurs there and propagates).
  template <typename Body>
  static bool capture(Decode& g, Buffers& buffers, bool& use_graphs, const at::Device& device, Body&& body) {
    auto abandon = [&]() {  // ends a failed capture: the side stream leaves capture mode, graphs go off
      try {
        g.graph.capture_end();
      } catch (...) {
      }
      buffers.use_workspace(nullptr);
      use_graphs = false;
    };
    // a pool stream of the engine's device (the guard also makes that device current): with the current device's
    // stream, an engine on another device would launch on its default stream during the capture. The guard
    // outlives the try block: a failed capture must end on the stream it began on.
    const c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromPool(false, device.index()));
    buffers.use_workspace(&g.workspace);
    try {
      g.graph.capture_begin();
      body();
      g.graph.capture_end();
    } catch (const std::exception& e) {
      abandon();
      TORCH_WARN("layerskip engine: capturing a CUDA graph of a step failed, steps run eagerly from now on: ",
                 e.what());
      return false;
    } catch (...) {
      abandon();
      throw;
    }
    buffers.use_workspace(nullptr);
    g.generation = buffers.generation();
    g.captured = true;
    return true;
  }

  // Uploads the staged inputs, replays, and returns the outputs on the host (the one synchronisation).
  at::Tensor replay(Decode& g) {
    g.in_long.copy_(g.host_long, /*non_blocking=*/true);
    g.in_double.copy_(g.host_double, /*non_blocking=*/true);
    g.graph.replay();
    replays += 1;
    return g.out.to(at::kCPU);  // host sync
  }
};

bool Engine::decode_group_graph(const std::vector<int64_t>& ids, int64_t E) {
  if (!graphs_ready()) return false;
  const int64_t n = static_cast<int64_t>(ids.size());
  GraphCache::Decode* entry = graphs_->entry_for(graphs_->decode[{E, n}], buffers_.generation());
  if (entry == nullptr) return false;
  GraphCache::Decode& g = *entry;
  if (!g.captured) GraphCache::allocate_io(g, 6 * n, 2 * n, 2 * n, weights_.device());

  GraphCache::stage_inputs(g, rows_, ids);
  if (!g.captured) {
    const bool captured = GraphCache::capture(g, buffers_, use_graphs_, weights_.device(), [&]() {
      auto part = [&](const at::Tensor& t, int64_t k) { return t.narrow(0, k * n, n); };
      at::Tensor x = buffers_.scratch("step_x", {n, config_.shape.hidden});  // [n, H]
      embed(x, part(g.in_long, 0));
      run_layers(x, 0, E, part(g.in_long, 1), part(g.in_long, 2), true);
      at::Tensor logits = exit_logits(x, "logits", true);  // [n, V]
      const at::Tensor finite = finite_rows(logits);      // [n]
      at::Tensor tokens = buffers_.scratch("tokens", {n}, at::kLong);
      ops_.sample.call(tokens, logits, part(g.in_double, 0), part(g.in_long, 4), part(g.in_double, 1),
                       part(g.in_long, 5), part(g.in_long, 3));
      g.out.narrow(0, 0, n).copy_(tokens);
      g.out.narrow(0, n, n).copy_(finite);
    });
    if (!captured) return false;
  }
  // host sync (in replay): the new tokens and their logits' finiteness, once per step
  const at::Tensor host = graphs_->replay(g);  // [2n]
  finish_decode(ids, host.data_ptr<int64_t>());
  return true;
}

bool Engine::speculative_group_graph(const std::vector<int64_t>& ids) {
  if (!graphs_ready()) return false;
  const ModelShape& shape = config_.shape;
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t L = shape.num_layers, H = shape.hidden, V = shape.vocab;
  const int64_t E = rows_.at(ids[0]).params.exit_layer;
  // per row as speculative_group: d_j, first counter c_j, position; graphs only when every d_j is the same d >= 1
  std::vector<int64_t> d(n), c(n), pos(n);
  bool greedy = true;
  for (int64_t j = 0; j < n; ++j) {
    const Row& r = rows_.at(ids[j]);
    const RowState& s = r.state;
    const int64_t remaining = r.params.max_new_tokens - static_cast<int64_t>(s.tokens.size());
    // the confidence threshold needs a host sync per draft step and the reduced head other buffers: eager
    if (r.params.policy.threshold > 0.0 || r.params.reduced_head) return false;
    d[j] = std::max<int64_t>(0, std::min({s.policy.length, remaining, s.capacity - s.position - 1}));
    c[j] = s.counter;
    pos[j] = s.position;
    greedy = greedy && r.params.temperature == 0.0;
  }
  const int64_t D = d[0];
  if (D < 1 || std::any_of(d.begin(), d.end(), [&](int64_t x) { return x != D; })) return false;
  const int64_t W = D + 1;
  GraphCache::Decode* entry = graphs_->entry_for(graphs_->rounds[{E, D, n, greedy}], buffers_.generation());
  if (entry == nullptr) return false;
  GraphCache::Decode& g = *entry;
  const at::Device device = weights_.device();
  if (!g.captured) GraphCache::allocate_io(g, 6 * n, 2 * n, n * W + n + n * W, device);

  GraphCache::stage_inputs(g, rows_, ids);  // positions pos[j], counters c[j]
  if (!g.captured) {
    const bool captured = GraphCache::capture(g, buffers_, use_graphs_, device, [&]() {
      auto part = [&](const at::Tensor& t, int64_t k) { return t.narrow(0, k * n, n); };
      const at::Tensor last = part(g.in_long, 0), slots = part(g.in_long, 1), base = part(g.in_long, 2),
                       counters = part(g.in_long, 3), top_k = part(g.in_long, 4), seeds = part(g.in_long, 5);
      const at::Tensor temperature = part(g.in_double, 0), top_p = part(g.in_double, 1);
      at::Tensor exit_cache = buffers_.scratch("exit_query_cache", {n, W, H});  // row j, step i at [j, i]
      at::Tensor drafts = buffers_.scratch("draft_tokens", {n, D}, at::kLong);
      at::Tensor draft_probs = greedy ? at::Tensor() : buffers_.scratch("draft_probs", {n, D, V});
      // 1. draft: step i for every row at position pos_j + i
      at::Tensor inputs = last;
      for (int64_t i = 0; i <= D; ++i) {
        at::Tensor x = buffers_.scratch("draft_x", {n, H});  // [n, H]
        embed(x, inputs);
        run_layers(x, 0, E, slots, at::add(base, i), true);
        exit_cache.select(1, i).copy_(x);
        if (i == D) break;
        at::Tensor logits = exit_logits(x, "draft_logits", true);  // [n, V]
        finite_rows(logits);  // a non-finite draft is only a bad guess: the verifier decides
        at::Tensor tokens = at::empty({n}, last.options());
        const at::Tensor step_counters = at::add(counters, i);
        if (greedy) {
          ops_.sample.call(tokens, logits, temperature, top_k, top_p, seeds, step_counters);
        } else {  // greedy rows get one-hot probabilities: the same token, and exact greedy acceptance below
          at::Tensor probs = buffers_.scratch("draft_step_probs", {n, V});
          ops_.sampling_probs.call(probs, logits, temperature, top_k, top_p);
          ops_.sample_from_probs.call(tokens, probs, seeds, step_counters);
          draft_probs.select(1, i).copy_(probs);
        }
        drafts.select(1, i).copy_(tokens);
        inputs = tokens;
      }
      // 2. verify: layers [E, L) over the n (D + 1) exit states, row j's block at positions pos_j .. pos_j + D
      // each row's value repeated W times, by expand + copy (no host synchronisation, unlike repeat_interleave)
      auto per_token = [&](const at::Tensor& t) { return t.unsqueeze(1).expand({n, W}).reshape({n * W}); };
      const at::Tensor v_rows = per_token(slots);                                                // [n W]
      const at::Tensor v_pos = (base.unsqueeze(1) + at::arange(W, base.options())).flatten();  // [n W]
      at::Tensor h = buffers_.scratch("verify_x", {n * W, H});
      h.copy_(exit_cache.view({n * W, H}));
      run_layers(h, E, L, v_rows, v_pos, true);
      at::Tensor logits = exit_logits(h, "logits", true);  // [n W, V]
      const at::Tensor finite = finite_rows(logits);      // [n W]
      // 3. accept
      at::Tensor tokens = buffers_.scratch("accept_tokens", {n, W}, at::kLong);
      at::Tensor num_accepted = buffers_.scratch("num_accepted", {n}, at::kLong);
      const at::Tensor lengths = at::full({n}, D, last.options());
      if (greedy) {
        ops_.speculative_accept_greedy.call(tokens, num_accepted, drafts, lengths, logits.view({n, W, V}));
      } else {
        at::Tensor probs = buffers_.scratch("target_probs", {n * W, V});
        ops_.sampling_probs.call(probs, logits, per_token(temperature), per_token(top_k), per_token(top_p));
        ops_.speculative_accept.call(tokens, num_accepted, drafts, lengths, draft_probs, probs.view({n, W, V}),
                                     seeds, at::add(counters, D));
      }
      g.out.narrow(0, 0, n * W).copy_(tokens.flatten());
      g.out.narrow(0, n * W, n).copy_(num_accepted);
      g.out.narrow(0, n * W + n, n * W).copy_(finite);
    });
    if (!captured) return false;
  }
  // host sync (in replay): the accepted tokens, their counts and the logits' finiteness, once per round
  const at::Tensor host = graphs_->replay(g);
  finish_round(ids, d, c, pos, W, host.data_ptr<int64_t>());
  return true;
}

bool Engine::graphs_ready() {
  if (!use_graphs_ || profiler_.enabled || !weights_.device().is_cuda()) return false;
  if (!graphs_) {
    if (!graphs_enabled_by_env()) {
      use_graphs_ = false;
      return false;
    }
    graphs_ = std::make_shared<GraphCache>();
  }
  return true;
}

int64_t Engine::graph_replays() { return graphs_ ? graphs_->replays : 0; }

#else  // no CUDA in this build: every step runs eagerly

struct Engine::GraphCache {};

bool Engine::decode_group_graph(const std::vector<int64_t>&, int64_t) { return false; }

bool Engine::speculative_group_graph(const std::vector<int64_t>&) { return false; }

bool Engine::graphs_ready() { return false; }

int64_t Engine::graph_replays() { return 0; }

#endif

void Engine::set_cuda_graphs(bool enabled) {
  use_graphs_ = enabled && graphs_enabled_by_env();
  graphs_.reset();  // drop captured graphs (and their memory)
}

}  // namespace engine
}  // namespace layerskip
