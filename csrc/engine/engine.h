// Engine: the C++ decoder loop (autoregressive, early exit, self-speculative) over resident state.
//
// Built once from the model config and weights; a generation is begin(...) then step(...) until
// finished(). step(0) runs a whole generation in one call; step(1) runs one round (the prefill, one
// decode step, or one draft / verify / accept round) so that a caller can stream the accepted tokens.
// Every computation is a layerskip op through the dispatcher or an ATen op on the weights' device.
//
// Random draws follow reference_generate.py: one counter per sampled token; a speculative round with
// d drafts at counter c draws c .. c+d-1 for the drafts, speculative_accept at c+d, then c += 3d + 1.
#pragma once
#include <torch/all.h>
#include <torch/custom_class.h>

#include <optional>
#include <string>
#include <vector>

#include "engine/buffers.h"
#include "engine/dispatch.h"
#include "engine/profiler.h"
#include "engine/weights.h"

namespace layerskip {
namespace engine {

enum class Strategy { autoregressive, early_exit, self_speculative };

// The arguments and progress of the current generation.
struct Generation {
  Strategy strategy = Strategy::autoregressive;
  int64_t exit_layer = 0, num_speculations = 1, max_new_tokens = 0, top_k = 0, seed = 0;
  int64_t context_length = 0, capacity = 0;  // capacity: positions this call may use (as the reference)
  double temperature = 0.0, top_p = 1.0;
  std::vector<int64_t> stop_token_ids;
  at::Tensor prompt;  // [P] int64 on the device
  int64_t prompt_length = 0;

  std::vector<int64_t> tokens;  // new tokens so far
  std::optional<std::string> finish_reason;
  bool prefilled = false;
  int64_t position = 0;  // position of the newest token, which no layer has processed yet
  int64_t counter = 0;   // next random draw
  int64_t drafted = 0, accepted = 0, rounds = 0;
  double prefill_s = 0.0, decode_s = 0.0;

  bool greedy() const { return temperature == 0.0; }
};

class Engine : public torch::CustomClassHolder {
 public:
  // weights: see build_weights (HF order). cos_sin_cache [max_pos, D] float32 (cos | sin).
  // weight_dtype: "float32" or "bfloat16" for the matmul weights. capacity: initial KV positions.
  Engine(int64_t num_layers, int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t intermediate, int64_t vocab, double rms_norm_eps, at::Tensor cos_sin_cache,
         std::vector<at::Tensor> weights, std::string weight_dtype, int64_t capacity);

  // Starts a generation (arguments already validated by generation.py; re-checked cheaply here).
  // strategy: "autoregressive" | "early_exit" | "self_speculative"; prompt [P] int64; stop ids [n] int64.
  void begin(at::Tensor prompt, std::string strategy, int64_t exit_layer, int64_t num_speculations,
             int64_t max_new_tokens, double temperature, int64_t top_k, double top_p, int64_t seed,
             at::Tensor stop_token_ids, int64_t context_length);
  // Runs up to max_rounds rounds (<= 0: until finished); returns the tokens they produced, [n] int64 CPU.
  at::Tensor step(int64_t max_rounds);
  bool finished() { return gen_.finish_reason.has_value(); }
  std::string finish_reason() { return gen_.finish_reason.value_or(""); }
  at::Tensor tokens();  // every new token of the current generation, [n] int64 CPU
  // tokens, drafted, accepted, rounds, prefill_time_s, decode_time_s of the current generation.
  c10::Dict<std::string, double> stats();

  int64_t capacity() { return buffers_.capacity(); }
  int64_t weight_bytes_per_token() { return weights_.bytes_per_token(); }
  void set_profiling(bool enabled) { profiler_.enabled = enabled; }
  void reset_profile() { profiler_.reset(); }
  c10::Dict<std::string, double> profile();  // seconds per category since the last reset

 private:
  // forward.cpp
  void embed(at::Tensor& out, const at::Tensor& ids);  // ids [T] -> out [T, H]
  // Layers [start, end) over the residual stream x [T, H] (in place), tokens at [start_pos, start_pos + T).
  void run_layers(at::Tensor& x, int64_t start, int64_t end, int64_t start_pos);
  at::Tensor exit_logits(const at::Tensor& x);  // residual [T, H] -> logits [T, V] (final norm + LM head)
  at::Tensor pick(const at::Tensor& logits);    // logits [1, V] -> token [1] int64, uses one draw

  // strategies.cpp
  bool push(int64_t token);  // appends a token; true when the generation must stop
  void prefill();
  void decode_step();
  void speculative_round();

  ModelShape shape_;
  ModelWeights weights_;
  Ops ops_;
  at::Tensor cos_sin_cache_;  // [max_pos, D]
  double attn_scale_;
  Buffers buffers_;
  Profiler profiler_;
  Generation gen_;
  std::vector<int64_t> step_tokens_;  // tokens produced by the current step() call
};

}  // namespace engine
}  // namespace layerskip
