// Engine construction, the begin / step streaming interface and the statistics.
#include "engine/engine.h"

#include <chrono>
#include <cmath>

namespace layerskip {
namespace engine {

namespace {

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

ModelShape make_shape(int64_t num_layers, int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t intermediate, int64_t vocab, double eps) {
  TORCH_CHECK(num_layers >= 1 && hidden >= 1 && num_heads >= 1 && num_kv_heads >= 1 && head_dim >= 2 &&
                  intermediate >= 1 && vocab >= 1,
              "Engine: model dimensions must be positive");
  TORCH_CHECK(num_heads % num_kv_heads == 0, "Engine: num_heads (", num_heads, ") must be a multiple of num_kv_heads (",
              num_kv_heads, ")");
  TORCH_CHECK(head_dim % 2 == 0, "Engine: head_dim must be even, got ", head_dim);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "Engine: rms_norm_eps must be positive, got ", eps);
  return ModelShape{num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, eps};
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Engine::Engine(int64_t num_layers, int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate, int64_t vocab, double rms_norm_eps, at::Tensor cos_sin_cache,
               std::vector<at::Tensor> weights, std::string weight_dtype, int64_t capacity)
    : shape_(make_shape(num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, rms_norm_eps)),
      weights_(build_weights(shape_, weights, parse_dtype(weight_dtype))),
      ops_(Ops::lookup()),
      attn_scale_(1.0 / std::sqrt(static_cast<double>(head_dim))),
      buffers_(shape_, weights_.embed.options()) {
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim, "Engine: cos_sin_cache must have shape ",
              "[max_positions, ", head_dim, "], got ", cos_sin_cache.sizes());
  TORCH_CHECK(capacity >= 1 && capacity <= cos_sin_cache.size(0), "Engine: capacity must be in [1, ",
              cos_sin_cache.size(0), "] (the rotary table's positions), got ", capacity);
  cos_sin_cache_ = cos_sin_cache.to(weights_.embed.device(), at::kFloat).contiguous();
  buffers_.reserve_positions(capacity);
}

void Engine::begin(at::Tensor prompt, std::string strategy, int64_t exit_layer, int64_t num_speculations,
                   int64_t max_new_tokens, double temperature, int64_t top_k, double top_p, int64_t seed,
                   at::Tensor stop_token_ids, int64_t context_length) {
  const int64_t L = shape_.num_layers;
  Generation g;
  g.strategy = parse_strategy(strategy);
  TORCH_CHECK(prompt.dim() == 1 && prompt.size(0) >= 1 && prompt.scalar_type() == at::kLong,
              "Engine: prompt must be a non-empty 1-D int64 tensor, got ", prompt.scalar_type(), " ", prompt.sizes());
  TORCH_CHECK(stop_token_ids.dim() == 1 && stop_token_ids.scalar_type() == at::kLong,
              "Engine: stop_token_ids must be a 1-D int64 tensor");
  g.prompt_length = prompt.size(0);
  TORCH_CHECK(max_new_tokens >= 0, "Engine: max_new_tokens must be >= 0, got ", max_new_tokens);
  TORCH_CHECK(context_length > g.prompt_length && context_length <= cos_sin_cache_.size(0),
              "Engine: context_length must be in (prompt length ", g.prompt_length, ", ", cos_sin_cache_.size(0),
              "], got ", context_length);
  const bool speculative = g.strategy == Strategy::self_speculative;
  g.exit_layer = g.strategy == Strategy::autoregressive ? L : exit_layer;
  TORCH_CHECK(g.exit_layer >= 1 && g.exit_layer <= (speculative ? L - 1 : L), "Engine: exit_layer ", exit_layer,
              " is out of range for strategy '", strategy, "' on a model with ", L, " layers");
  g.num_speculations = speculative ? num_speculations : 0;
  TORCH_CHECK(!speculative || num_speculations >= 1, "Engine: num_speculations must be >= 1, got ", num_speculations);
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "Engine: temperature must be finite and >= 0");
  TORCH_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1, "Engine: need top_k >= 0 and top_p in (0, 1]");
  g.max_new_tokens = max_new_tokens;
  g.temperature = temperature;
  g.top_k = top_k;
  g.top_p = top_p;
  g.seed = seed;
  g.context_length = context_length;
  // room for the prompt, the new tokens and one verify block past the last accepted token
  g.capacity = std::min(context_length, g.prompt_length + max_new_tokens + g.num_speculations + 1);
  const at::Tensor stop = stop_token_ids.to(at::kCPU).contiguous();
  g.stop_token_ids.assign(stop.data_ptr<int64_t>(), stop.data_ptr<int64_t>() + stop.numel());
  const at::Tensor host_prompt = prompt.to(at::kCPU);
  const auto minmax = at::aminmax(host_prompt);
  TORCH_CHECK(std::get<0>(minmax).item<int64_t>() >= 0 && std::get<1>(minmax).item<int64_t>() < shape_.vocab,
              "Engine: prompt token ids must be in [0, ", shape_.vocab, ")");
  g.prompt = prompt.to(weights_.embed.device());
  if (max_new_tokens == 0) g.finish_reason = "length";

  buffers_.reserve_positions(g.capacity);
  buffers_.reserve_speculations(g.num_speculations, speculative && temperature > 0);
  gen_ = std::move(g);
}

at::Tensor Engine::step(int64_t max_rounds) {
  TORCH_CHECK(gen_.prompt.defined(), "Engine: call begin() before step()");
  c10::InferenceMode guard;
  step_tokens_.clear();
  for (int64_t r = 0; !finished() && (max_rounds <= 0 || r < max_rounds); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!gen_.prefilled) {
      prefill();
      gen_.prefilled = true;
      gen_.prefill_s += seconds_since(t0);
      continue;
    }
    if (gen_.strategy == Strategy::self_speculative) {
      speculative_round();
    } else {
      decode_step();
    }
    gen_.decode_s += seconds_since(t0);
  }
  return at::tensor(step_tokens_, at::kLong);
}

at::Tensor Engine::tokens() { return at::tensor(gen_.tokens, at::kLong); }

c10::Dict<std::string, double> Engine::stats() {
  c10::Dict<std::string, double> d;
  d.insert("tokens", static_cast<double>(gen_.tokens.size()));
  d.insert("drafted", static_cast<double>(gen_.drafted));
  d.insert("accepted", static_cast<double>(gen_.accepted));
  d.insert("rounds", static_cast<double>(gen_.rounds));
  d.insert("prefill_time_s", gen_.prefill_s);
  d.insert("decode_time_s", gen_.decode_s);
  return d;
}

c10::Dict<std::string, double> Engine::profile() {
  c10::Dict<std::string, double> d;
  for (int c = 0; c < static_cast<int>(Cat::count); ++c) d.insert(cat_name(static_cast<Cat>(c)), profiler_.seconds[c]);
  return d;
}

}  // namespace engine
}  // namespace layerskip
