// Engine construction, the add_row / step / remove_row interface and the per-row results.
#include "engine/engine.h"
#include "engine/huge_pages.h"
#include "ops.h"
#include "sampling_rules.h"

#include "cpu/parallel.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <tuple>

namespace layerskip {
namespace engine {

namespace {

// Holds the engine for the duration of a call; a concurrent or re-entrant call fails clearly instead of
// corrupting the state.
class Busy {
 public:
  explicit Busy(std::mutex& m) : lock_(m, std::try_to_lock) {
    TORCH_CHECK(lock_.owns_lock(),
                "Engine: another call is running on this engine (calls from two threads, or from inside a "
                "callback of a running call); one call at a time");
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "Engine: weight_dtype must be 'float32' or 'bfloat16', got '", name, "'");
}

Strategy parse_strategy(const std::string& name) {
  if (name == "autoregressive") return Strategy::autoregressive;
  if (name == "early_exit") return Strategy::early_exit;
  if (name == "self_speculative") return Strategy::self_speculative;
  TORCH_CHECK(false, "Engine: strategy must be 'autoregressive', 'early_exit' or 'self_speculative', got '", name,
              "'");
}

int64_t config_value(const c10::Dict<std::string, int64_t>& config, const char* key) {
  TORCH_CHECK(config.contains(key), "Engine: config is missing '", key, "'");
  return config.at(key);
}

void check_shape(const ModelShape& s) {
  TORCH_CHECK(s.num_layers >= 1 && s.hidden >= 1 && s.num_heads >= 1 && s.num_kv_heads >= 1 && s.head_dim >= 2 &&
                  s.intermediate >= 1 && s.vocab >= 1,
              "Engine: model dimensions must be positive");
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "Engine: num_heads (", s.num_heads,
              ") must be a multiple of num_kv_heads (", s.num_kv_heads, ")");
  TORCH_CHECK(s.head_dim % 2 == 0, "Engine: head_dim must be even, got ", s.head_dim);
  TORCH_CHECK(s.rms_norm_eps > 0 && std::isfinite(s.rms_norm_eps), "Engine: rms_norm_eps must be positive, got ",
              s.rms_norm_eps);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Engine::Engine(EngineConfig config, at::Tensor cos_sin_cache, const c10::Dict<std::string, at::Tensor>& weights,
               const c10::Dict<std::string, int64_t>& weight_formats)
    : config_(config),
      weights_((check_shape(config.shape), build_weights(config.shape, weights, weight_formats, config.weight_dtype))),
      ops_(Ops::lookup()),
      attn_scale_(1.0 / std::sqrt(static_cast<double>(config.shape.head_dim))),
      buffers_(config.shape, weights_.final_norm.options()) {
  const int64_t D = config.shape.head_dim;
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == D, "Engine: cos_sin_cache must have shape ",
              "[max_positions, ", D, "], got ", cos_sin_cache.sizes());
  TORCH_CHECK(config.capacity >= 1 && config.capacity <= cos_sin_cache.size(0), "Engine: capacity must be in [1, ",
              cos_sin_cache.size(0), "] (the rotary table's positions), got ", config.capacity);
  TORCH_CHECK(config.max_positions >= cos_sin_cache.size(0), "Engine: max_positions (", config.max_positions,
              ") must cover the rotary table's ", cos_sin_cache.size(0), " positions");
  TORCH_CHECK(config.max_rows >= 1 && config.max_rows <= kMaxRows, "Engine: max_rows must be in [1, ", kMaxRows,
              "], got ", config.max_rows);
  huge_page_bytes_ = place_in_huge_pages(weights_);
  cos_sin_cache_ = cos_sin_cache.to(weights_.device(), at::kFloat).contiguous();
  buffers_.reserve(config.max_rows, config.capacity);
  slot_used_.assign(buffers_.rows(), false);
}

c10::intrusive_ptr<Engine> Engine::create(c10::Dict<std::string, int64_t> config, double rms_norm_eps,
                                          at::Tensor cos_sin_cache, c10::Dict<std::string, at::Tensor> weights,
                                          c10::Dict<std::string, int64_t> weight_formats, std::string weight_dtype) {
  EngineConfig c;
  c.shape = ModelShape{config_value(config, "num_layers"),   config_value(config, "hidden_size"),
                       config_value(config, "num_heads"),    config_value(config, "num_kv_heads"),
                       config_value(config, "head_dim"),     config_value(config, "intermediate_size"),
                       config_value(config, "vocab_size"),   rms_norm_eps};
  c.weight_dtype = parse_dtype(weight_dtype);
  c.max_rows = config_value(config, "max_rows");
  c.capacity = config_value(config, "capacity");
  // without max_positions, the table bounds the context (as it did before set_rope_table existed)
  c.max_positions = config.contains("max_positions") ? config.at("max_positions") : cos_sin_cache.size(0);
  return c10::make_intrusive<Engine>(c, cos_sin_cache, weights, weight_formats);
}

int64_t Engine::add_row(at::Tensor prompt, std::string strategy, int64_t exit_layer, int64_t num_speculations,
                        int64_t max_new_tokens, double temperature, int64_t top_k, double top_p, int64_t seed,
                        at::Tensor stop_token_ids, int64_t context_length) {
  Busy busy(busy_);
  // 1. validate everything; nothing is changed before the last check
  const int64_t L = config_.shape.num_layers, V = config_.shape.vocab;
  Row r;
  RowParams& p = r.params;
  RowState& s = r.state;
  p.strategy = parse_strategy(strategy);
  TORCH_CHECK(prompt.dim() == 1 && prompt.size(0) >= 1 && prompt.scalar_type() == at::kLong,
              "Engine: prompt must be a non-empty 1-D int64 tensor, got ", prompt.scalar_type(), " ", prompt.sizes());
  TORCH_CHECK(stop_token_ids.dim() == 1 && stop_token_ids.scalar_type() == at::kLong,
              "Engine: stop_token_ids must be a 1-D int64 tensor");
  s.prompt_length = prompt.size(0);
  TORCH_CHECK(max_new_tokens >= 0, "Engine: max_new_tokens must be >= 0, got ", max_new_tokens);
  TORCH_CHECK(context_length > s.prompt_length && context_length <= config_.max_positions,
              "Engine: context_length must be in (prompt length ", s.prompt_length, ", ", config_.max_positions,
              "], got ", context_length);
  const bool speculative = p.strategy == Strategy::self_speculative;
  p.exit_layer = p.strategy == Strategy::autoregressive ? L : exit_layer;
  TORCH_CHECK(p.exit_layer >= 1 && p.exit_layer <= (speculative ? L - 1 : L), "Engine: exit_layer ", exit_layer,
              " is out of range for strategy '", strategy, "' on a model with ", L, " layers");
  TORCH_CHECK(!speculative || (num_speculations >= 1 && num_speculations <= 1024),
              "Engine: num_speculations must be in [1, 1024], got ", num_speculations);
  p.num_speculations = speculative ? num_speculations : 0;
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "Engine: temperature must be finite and >= 0");
  // the sampling ops' rule: on the GPU a row outside it samples -1, and a -1 draft would index the embedding out
  // of range
  TORCH_CHECK(temperature_in_range(temperature),
              "Engine: temperature must be 0 (greedy) or in [1e-4, 1e4], got ", temperature);
  TORCH_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1, "Engine: need top_k >= 0 and top_p in (0, 1]");
  p.max_new_tokens = max_new_tokens;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  p.context_length = context_length;
  const at::Tensor stop = stop_token_ids.to(at::kCPU).contiguous();
  p.stop_token_ids.assign(stop.data_ptr<int64_t>(), stop.data_ptr<int64_t>() + stop.numel());
  const at::Tensor host_prompt = prompt.to(at::kCPU).contiguous();
  const int64_t* ids = host_prompt.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.prompt_length; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < V, "Engine: prompt token ", i, " = ", ids[i], " is outside [0, ", V, ")");
  }
  // room for the prompt, the new tokens and one verify block past the last accepted token; written so that
  // it cannot overflow (max_new_tokens may be huge: context_length bounds it)
  const int64_t room = context_length - s.prompt_length;  // > 0
  s.capacity = max_new_tokens >= room ? context_length
                                      : std::min(context_length, s.prompt_length + max_new_tokens + p.num_speculations + 1);
  TORCH_CHECK(s.capacity <= cos_sin_cache_.size(0), "Engine: the row reaches position ", s.capacity,
              " but the rotary table covers ", cos_sin_cache_.size(0), " positions (grow it with set_rope_table)");
  if (max_new_tokens == 0) s.finish_reason = "length";
  if (speculative) {
    const ModelShape& m = config_.shape;
    const int64_t layer = draft_policy::layer_weights(m.hidden, m.q_size(), m.kv_size(), m.intermediate);
    p.policy.max_length = p.num_speculations;
    p.policy.draft_cost = draft_policy::draft_cost(p.exit_layer, L, layer, m.hidden, V, V);
  }
  s.policy = draft_policy::initial_state(p.policy);

  // 2. reserve a cache row (growing the buffers keeps every other row's contents)
  int64_t slot = 0;
  while (slot < static_cast<int64_t>(slot_used_.size()) && slot_used_[slot]) ++slot;
  buffers_.reserve(slot + 1, s.capacity);
  if (slot >= static_cast<int64_t>(slot_used_.size())) slot_used_.resize(slot + 1, false);
  s.slot = slot;
  s.prompt = host_prompt.to(weights_.device());
  slot_used_[slot] = true;
  const int64_t id = next_id_++;
  rows_.emplace(id, std::move(r));
  return id;
}

void Engine::reserve(int64_t rows, int64_t capacity) {
  Busy busy(busy_);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "Engine: reserve: rows must be in [1, ", kMaxRows, "], got ", rows);
  TORCH_CHECK(capacity >= 1 && capacity <= config_.max_positions, "Engine: reserve: capacity must be in [1, ",
              config_.max_positions, "], got ", capacity);
  buffers_.reserve(rows, capacity);
}

void Engine::release_cache() {
  Busy busy(busy_);
  TORCH_CHECK(rows_.empty(), "Engine: release_cache needs an engine without rows (", rows_.size(), " held)");
  buffers_.release();
  slot_used_.clear();
}

void Engine::set_threads(int64_t threads) {
  Busy busy(busy_);
  TORCH_CHECK(threads >= 0 && threads <= 4096, "Engine: threads must be in [0, 4096] (0: torch's count), got ",
              threads);
  threads_ = threads;
}

at::Tensor Engine::step() {
  Busy busy(busy_);
  step_rows();
  const int64_t n = static_cast<int64_t>(step_output_.size()) / 2;
  return at::tensor(step_output_, at::kLong).view({n, 2});
}

int64_t Engine::run(double max_seconds) {
  Busy busy(busy_);
  TORCH_CHECK(max_seconds >= 0.0 && max_seconds <= 1e9, "Engine: run: max_seconds must be in [0, 1e9], got ",
              max_seconds);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t steps = 0;
  do {  // at least one step, so that a caller looping on has_unfinished() always makes progress
    step_rows();
    ++steps;
  } while (has_unfinished() && seconds_since(t0) < max_seconds);
  return steps;
}

// Rows prefill together when they use the same layers and sharing a pass cannot change their numbers: packed
// matmuls are batch invariant at any T (quant_kernel_simd.inc), float ones while the pass has at most
// kLinearSkinnyMaxTokens tokens (the skinny kernel, CPU and CUDA alike, as in each row's own prefill of at
// most that many tokens; longer float passes go to the GEMM, whose order depends on T). Other rows prefill
// alone; a pass holds at most kPrefillPassTokens tokens. Norms, rotary and attention work per token or row.
std::vector<Engine::PrefillPass> Engine::prefill_passes(const std::vector<int64_t>& ids) const {
  const bool packed = weights_.layers.empty() || weights_.layers[0].qkv.packed();
  const int64_t most = packed ? kPrefillPassTokens : kLinearSkinnyMaxTokens;
  std::vector<PrefillPass> passes;
  std::map<int64_t, size_t> open;  // layers -> index of the pass still taking rows
  for (int64_t id : ids) {
    const Row& r = rows_.at(id);
    const int64_t layers = r.params.strategy == Strategy::early_exit ? r.params.exit_layer : config_.shape.num_layers;
    const int64_t P = r.state.prompt_length;
    auto it = open.find(layers);
    if (P <= most && it != open.end() && passes[it->second].tokens + P <= most) {
      passes[it->second].ids.push_back(id);
      passes[it->second].tokens += P;
      continue;
    }
    passes.push_back(PrefillPass{{id}, layers, P});
    if (P <= most) {
      open[layers] = passes.size() - 1;
    } else {
      open.erase(layers);
    }
  }
  return passes;
}

void Engine::step_rows() {
  c10::InferenceMode guard;
  cpu::ThreadCapGuard cap(threads_);
  step_output_.clear();
  // rows to prefill, and the groups of prefilled rows that run a round
  std::vector<int64_t> to_prefill;
  // (strategy, E, d, reduced draft head) -> ids
  std::map<std::tuple<int, int64_t, int64_t, bool>, std::vector<int64_t>> groups;
  for (auto& [id, r] : rows_) {
    if (r.state.finish_reason) continue;
    if (!r.state.prefilled) {
      to_prefill.push_back(id);
    } else {
      const RowParams& p = r.params;
      if (p.strategy == Strategy::self_speculative && !draft_policy::speculating(r.state.policy)) {
        // drafting is off for this row: it joins the plain (autoregressive) step
        groups[std::make_tuple(static_cast<int>(Strategy::autoregressive), config_.shape.num_layers, int64_t{0}, false)]
            .push_back(id);
        continue;
      }
      groups[std::make_tuple(static_cast<int>(p.strategy), p.exit_layer, p.num_speculations, p.reduced_head)]
          .push_back(id);
    }
  }
  for (const PrefillPass& pass : prefill_passes(to_prefill)) {
    const auto t0 = std::chrono::steady_clock::now();
    prefill(pass.ids, pass.layers);
    const double dt = seconds_since(t0);
    for (int64_t id : pass.ids) rows_.at(id).state.prefill_s += dt;
  }
  for (auto& [key, ids] : groups) {
    const auto t0 = std::chrono::steady_clock::now();
    if (static_cast<Strategy>(std::get<0>(key)) == Strategy::self_speculative) {
      speculative_group(ids);
    } else {
      decode_group(ids, std::get<1>(key));
    }
    const double dt = seconds_since(t0);
    for (int64_t id : ids) rows_.at(id).state.decode_s += dt;
  }
}

void Engine::remove_row(int64_t id) {
  Busy busy(busy_);
  Row& r = row(id);
  slot_used_[r.state.slot] = false;
  rows_.erase(id);
}

void Engine::set_row_policy(int64_t id, double threshold, bool adaptive, int64_t probe_interval, bool reduced_head) {
  Busy busy(busy_);
  Row& r = row(id);
  TORCH_CHECK(r.params.strategy == Strategy::self_speculative, "Engine: set_row_policy: row ", id,
              " is not self-speculative");
  TORCH_CHECK(!r.state.prefilled, "Engine: set_row_policy: row ", id, " has already been stepped");
  TORCH_CHECK(threshold >= 0.0 && threshold <= 1.0, "Engine: draft threshold must be in [0, 1], got ", threshold);
  TORCH_CHECK(probe_interval >= 1 && probe_interval <= (int64_t{1} << 20),
              "Engine: probe_interval must be in [1, 2^20], got ", probe_interval);
  TORCH_CHECK(!reduced_head || draft_vocab_.defined(), "Engine: set_row_policy: a reduced draft head needs "
              "set_draft_vocab first");
  draft_policy::Params& p = r.params.policy;
  if (reduced_head) {
    const ModelShape& m = config_.shape;
    const int64_t layer = draft_policy::layer_weights(m.hidden, m.q_size(), m.kv_size(), m.intermediate);
    p.draft_cost = draft_policy::draft_cost(r.params.exit_layer, m.num_layers, layer, m.hidden,
                                            draft_vocab_.size(0), m.vocab);
  }
  r.params.reduced_head = reduced_head;
  p.threshold = threshold;
  p.adaptive = adaptive;
  p.probe_interval = probe_interval;
  r.state.policy = draft_policy::initial_state(p);
}

void Engine::set_draft_vocab(at::Tensor token_ids) {
  Busy busy(busy_);
  TORCH_CHECK(rows_.empty(), "Engine: set_draft_vocab needs an engine without rows");
  const int64_t V = config_.shape.vocab;
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.scalar_type() == at::kLong && token_ids.size(0) >= 1 &&
                  token_ids.size(0) <= V,
              "Engine: draft vocabulary must be a 1-D int64 tensor of 1 to ", V, " token ids");
  const at::Tensor host = token_ids.to(at::kCPU).contiguous();
  const int64_t* ids = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < host.size(0); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < V && (i == 0 || ids[i] > ids[i - 1]), "Engine: draft vocabulary must be "
                "strictly ascending token ids in [0, ", V, "); entry ", i, " is ", ids[i]);
  }
  draft_vocab_ = host.to(weights_.device());
  draft_head_ = weights_.lm_head.rows(draft_vocab_);  // [K, H]
}

void Engine::set_rope_table(at::Tensor cos_sin_cache) {
  Busy busy(busy_);
  const int64_t D = config_.shape.head_dim, P = cos_sin_cache_.size(0);
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == D && cos_sin_cache.size(0) >= P &&
                  cos_sin_cache.size(0) <= config_.max_positions,
              "Engine: set_rope_table needs a [P, ", D, "] table with P in [", P, ", ", config_.max_positions,
              "], got ", cos_sin_cache.sizes());
  cos_sin_cache_ = cos_sin_cache.to(weights_.device(), at::kFloat).contiguous();
  graphs_.reset();  // captured graphs read the old table
}

Row& Engine::row(int64_t id) {
  auto it = rows_.find(id);
  TORCH_CHECK(it != rows_.end(), "Engine: no row with id ", id);
  return it->second;
}

std::vector<int64_t> Engine::row_ids() {
  std::vector<int64_t> ids;
  for (const auto& item : rows_) ids.push_back(item.first);
  return ids;
}

bool Engine::has_unfinished() {
  for (const auto& item : rows_) {
    if (!item.second.state.finish_reason) return true;
  }
  return false;
}

std::string Engine::finish_reason(int64_t id) { return row(id).state.finish_reason.value_or(""); }

std::string Engine::error(int64_t id) { return row(id).state.error; }

at::Tensor Engine::tokens(int64_t id) { return at::tensor(row(id).state.tokens, at::kLong); }

c10::Dict<std::string, double> Engine::stats(int64_t id) {
  const RowState& s = row(id).state;
  c10::Dict<std::string, double> d;
  d.insert("tokens", static_cast<double>(s.tokens.size()));
  d.insert("drafted", static_cast<double>(s.drafted));
  d.insert("accepted", static_cast<double>(s.accepted));
  d.insert("rounds", static_cast<double>(s.rounds));
  d.insert("prefill_time_s", s.prefill_s);
  d.insert("decode_time_s", s.decode_s);
  return d;
}

c10::Dict<std::string, double> Engine::profile() {
  c10::Dict<std::string, double> d;
  for (int c = 0; c < static_cast<int>(Cat::count); ++c) d.insert(cat_name(static_cast<Cat>(c)), profiler_.seconds[c]);
  return d;
}

}  // namespace engine
}  // namespace layerskip
