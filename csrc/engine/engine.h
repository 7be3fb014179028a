// Engine: the batched C++ decoder loop (autoregressive, early exit, self-speculative) over resident state.
//
// Built once from an EngineConfig and the model's weights keyed by their HF names. Its interface is the one
// continuous batching needs:
//   id = add_row(prompt, params)   validates everything first (a failed call changes nothing), reserves a cache
//                                  row; the row is prefilled by the next step().
//   step()                         prefills the rows added since the last step (together, in passes of rows
//                                  that use the same layers: prefill_passes),
//                                  then runs one round for every other unfinished row: rows are grouped by
//                                  (strategy, exit_layer, num_speculations) and each group runs batched (a
//                                  decode step with T = rows of the group, or a speculative round drafting d
//                                  tokens for every row and verifying all of them in one pass). Returns the new
//                                  tokens as (row id, token) pairs in order; finished rows cost nothing.
//   run(max_seconds)               steps until no row is unfinished (or the time is up): a whole generation
//                                  without returning to the caller per token (generate() without a callback).
//   remove_row(id)                 releases the row's cache slot at once (finished or not).
// Rows may differ in everything: prompt, strategy, exit layer, draft length, sampling parameters, seed, stop
// ids, max_new_tokens and context length. Row i yields exactly the tokens of a batch of one (every kernel on
// the step path is batch invariant; rows share a prefill pass only where that changes none of their numbers).
//
// Random draws follow reference_generate.py, per row: one counter per sampled token; a speculative round with
// d drafts at counter c draws c .. c+d-1 for the drafts, the acceptance from c+d, then c += 3d + 1.
// Host syncs: one per prefill pass and one per group and step (marked "host sync" in strategies.cpp).
// Not thread safe: one call at a time (a second concurrent call raises); engine.py serializes callers.
#pragma once
#include <torch/all.h>
#include <torch/custom_class.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/buffers.h"
#include "engine/dispatch.h"
#include "engine/draft_policy.h"
#include "engine/profiler.h"
#include "engine/weights.h"

namespace layerskip {
namespace engine {

enum class Strategy { autoregressive, early_exit, self_speculative };

// The model and the engine's initial sizes.
struct EngineConfig {
  ModelShape shape;
  at::ScalarType weight_dtype = at::kFloat;  // matmul weights: float32 or bfloat16
  int64_t max_rows = 1;                      // cache rows allocated up front (grown on demand)
  int64_t capacity = 512;                    // cache positions per row allocated up front (grown on demand)
  int64_t max_positions = 0;                 // the model's context limit (max_position_embeddings); the rotary
                                             // table may cover fewer positions (grown with set_rope_table)
};

// The arguments of one row's generation (validated by add_row).
struct RowParams {
  Strategy strategy = Strategy::autoregressive;
  int64_t exit_layer = 0;        // layers of the draft / the early exit (L for autoregressive)
  int64_t num_speculations = 0;  // d (0 unless self-speculative)
  int64_t max_new_tokens = 0, top_k = 0, seed = 0, context_length = 0;
  double temperature = 0.0, top_p = 1.0;
  std::vector<int64_t> stop_token_ids;
  draft_policy::Params policy;  // self-speculative drafting policy (set_row_policy; defaults: fixed d)
  bool reduced_head = false;    // drafts use only the draft vocabulary's rows of the LM head (set_draft_vocab)
};

// The progress of one row.
struct RowState {
  int64_t slot = 0;             // cache row
  at::Tensor prompt;            // [P] int64 on the device
  int64_t prompt_length = 0;
  int64_t capacity = 0;         // positions this row may use: min(context, P + max_new + d + 1), as the reference
  std::vector<int64_t> tokens;  // new tokens so far
  std::optional<std::string> finish_reason;  // "stop" | "length" | "context" | "error"
  std::string error;                         // why, when finish_reason is "error"
  bool prefilled = false;
  int64_t position = 0;  // position of the newest token, which no layer has processed yet
  int64_t counter = 0;   // next random draw
  int64_t drafted = 0, accepted = 0, rounds = 0;
  draft_policy::State policy;  // draft length / plain decoding of a self-speculative row
  double prefill_s = 0.0, decode_s = 0.0;
};

struct Row {
  RowParams params;
  RowState state;
};

class Engine : public torch::CustomClassHolder {
 public:
  Engine(EngineConfig config, at::Tensor cos_sin_cache, const c10::Dict<std::string, at::Tensor>& weights,
         const c10::Dict<std::string, int64_t>& weight_formats = c10::Dict<std::string, int64_t>());

  // Python constructor: config keys num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
  // intermediate_size, vocab_size, max_rows, capacity; weights by HF name (no lm_head.weight: tied).
  // weight_formats: the matrices given as packed GGUF blocks, name -> GGUF format (see build_weights).
  static c10::intrusive_ptr<Engine> create(c10::Dict<std::string, int64_t> config, double rms_norm_eps,
                                           at::Tensor cos_sin_cache, c10::Dict<std::string, at::Tensor> weights,
                                           c10::Dict<std::string, int64_t> weight_formats, std::string weight_dtype);

  // A new row; returns its id. prompt [P] int64; stop_token_ids [n] int64; strategy "autoregressive" |
  // "early_exit" | "self_speculative". Throws (changing nothing) on any invalid argument.
  int64_t add_row(at::Tensor prompt, std::string strategy, int64_t exit_layer, int64_t num_speculations,
                  int64_t max_new_tokens, double temperature, int64_t top_k, double top_p, int64_t seed,
                  at::Tensor stop_token_ids, int64_t context_length);
  // One step over every unfinished row (see the file comment): [n, 2] int64 CPU pairs (row id, new token).
  at::Tensor step();
  // Steps until no row is unfinished or max_seconds have passed (at least one step), without returning to the
  // caller in between (generate() without a per-token callback); the tokens stay in the rows. -> steps run.
  int64_t run(double max_seconds);
  void remove_row(int64_t id);
  // The drafting policy of a self-speculative row not yet stepped (csrc/engine/draft_policy.h): stop a round
  // below `threshold` top probability (0: never); `adaptive`: adapt the length, switch drafting off when it
  // does not pay, probe again after `probe_interval` plain tokens. Throws (changing nothing) on bad input.
  // reduced_head: the row drafts with the reduced LM head of set_draft_vocab (verification keeps the whole head).
  void set_row_policy(int64_t id, double threshold, bool adaptive, int64_t probe_interval, bool reduced_head);
  // The reduced draft head: token ids [K] int64, strictly ascending in [0, V); its rows of the LM head are
  // copied once. Only on an engine without rows.
  void set_draft_vocab(at::Tensor token_ids);
  // Replaces the rotary table by a longer one [P, D] (P in [current rows, max_positions]) whose first rows are the
  // current ones; the table is sized by the contexts rows reach, not by max_positions. Drops captured graphs.
  void set_rope_table(at::Tensor cos_sin_cache);
  int64_t rope_positions() { return cos_sin_cache_.size(0); }  // positions the rotary table covers
  int64_t draft_vocab_size() { return draft_vocab_.defined() ? draft_vocab_.size(0) : 0; }

  std::vector<int64_t> row_ids();  // rows held (finished or not), ascending
  bool has_unfinished();           // some row still needs steps
  std::string finish_reason(int64_t id);  // "" while the row runs
  std::string error(int64_t id);          // the message of a row that finished with "error"
  at::Tensor tokens(int64_t id);          // every new token of the row, [n] int64 CPU
  // tokens, drafted, accepted, rounds, prefill_time_s, decode_time_s of a row.
  c10::Dict<std::string, double> stats(int64_t id);

  int64_t capacity() { return buffers_.capacity(); }
  int64_t max_rows() { return buffers_.rows(); }
  // Grows the KV cache at once to `rows` rows of `capacity` positions (within kMaxRows and the model's
  // positions), so that adding that many rows copies nothing: each add_row past the allocated rows copies the
  // whole cache. Drops captured graphs when it reallocates.
  void reserve(int64_t rows, int64_t capacity);
  // Frees the KV cache (an engine without rows only); the next add_row allocates what it needs.
  void release_cache();
  int64_t cache_bytes() { return buffers_.cache_bytes(); }
  // Bytes the KV cache takes with `rows` rows of `capacity` positions (to check memory before reserve).
  int64_t cache_bytes_for(int64_t rows, int64_t capacity) { return buffers_.bytes_for(rows, capacity); }
  static constexpr int64_t kMaxRows = 4096;  // cache rows an engine may hold
  int64_t weight_bytes_per_token() { return weights_.bytes_per_token(); }
  // Bytes of weight matrices the engine copied into memory advised for huge pages (engine/huge_pages.h); 0
  // on CUDA or with LAYERSKIP_HUGE_PAGES=0.
  int64_t huge_page_bytes() { return huge_page_bytes_; }
  // Median seconds of `reps` plain reads of the weight_bytes_per_token() bytes a decode step reads, from the
  // engine's own pages on its threads (weight_read.cpp): the denominator of a fair memory roofline. CPU only.
  double weight_read_seconds(int64_t reps);
  // Threads the engine's own CPU ops may use (cpu/parallel.h); 0: torch's thread count. Applies to this engine's
  // calls only: torch's global setting is left alone.
  void set_threads(int64_t threads);
  int64_t threads() { return threads_; }
  void set_profiling(bool enabled) { profiler_.enabled = enabled; }
  // CUDA graphs (on by default on a CUDA device; cuda_graphs.cpp): decode steps replayed from a graph captured
  // per (exit layer, rows in the step). graph_replays counts the steps that ran from a graph.
  void set_cuda_graphs(bool enabled);
  int64_t graph_replays();
  void reset_profile() { profiler_.reset(); }
  c10::Dict<std::string, double> profile();  // seconds per category since the last reset

 private:
  // forward.cpp
  void embed(at::Tensor& out, const at::Tensor& ids);  // ids [T] -> out [T, H]
  // Layers [start, end) over the residual stream x [T, H] (in place); token t at (rows[t], positions[t]).
  // batch_invariant: every matmul goes through linear's skinny kernel (steps); false for a prefill.
  void run_layers(at::Tensor& x, int64_t start, int64_t end, const at::Tensor& rows, const at::Tensor& positions,
                  bool batch_invariant);
  // residual x [T, H] -> logits [T, V] (final norm + LM head), into the workspace tensor `name`.
  at::Tensor exit_logits(const at::Tensor& x, const char* name, bool batch_invariant);
  // residual x [T, H] -> draft logits over the draft vocabulary [T, K] (final norm + reduced head).
  at::Tensor reduced_logits(const at::Tensor& x);
  void linear(at::Tensor& out, const at::Tensor& x, const Matrix& w, bool batch_invariant);  // x @ w^T

  // strategies.cpp
  bool push(Row& row, int64_t id, int64_t token);  // appends a token; true when the row must stop
  // Rows whose prompts go through the same layers in one pass (see prefill_passes), with their token count.
  struct PrefillPass {
    std::vector<int64_t> ids;
    int64_t layers, tokens;
  };
  static constexpr int64_t kPrefillPassTokens = 512;  // the most prompt tokens one packed prefill pass takes
  std::vector<PrefillPass> prefill_passes(const std::vector<int64_t>& ids) const;  // in the order of ids
  void prefill(const std::vector<int64_t>& ids, int64_t layers);
  void decode_group(const std::vector<int64_t>& ids, int64_t layers);  // one token through layers [0, layers)
  // Updates the rows of a decode step from its host outputs out [2n]: tokens, then finite flags.
  void finish_decode(const std::vector<int64_t>& ids, const int64_t* out);
  // cuda_graphs.cpp: runs the decode step of `ids` through layers [0, layers) from a captured CUDA graph; false
  // when it does not (not on CUDA, graphs off, profiling, or the first step of its shape, which runs eagerly).
  bool decode_group_graph(const std::vector<int64_t>& ids, int64_t layers);
  void speculative_group(const std::vector<int64_t>& ids);
  // Updates the rows of a round (draft lengths d, first counters c, positions pos) from its host outputs out:
  // tokens [n, W] (W: the round's planned max d + 1; a threshold may have cut the d_j below it), accepted
  // counts [n], finite flags of the verified positions.
  void finish_round(const std::vector<int64_t>& ids, const std::vector<int64_t>& d, const std::vector<int64_t>& c,
                    const std::vector<int64_t>& pos, int64_t W, const int64_t* out);
  // cuda_graphs.cpp: runs the round of `ids` from a captured CUDA graph when every row drafts the same d with no
  // confidence threshold and the full head; false when it does not (as decode_group_graph).
  bool speculative_group_graph(const std::vector<int64_t>& ids);
  bool graphs_ready();  // CUDA, graphs on, not profiling (creates the graph cache)
  // Per-token sampling parameters of rows `ids` (token j of row ids[j], counter offsets added): [T] tensors.
  struct SamplingParams {
    at::Tensor temperature, top_k, top_p, seeds, counters;
  };
  SamplingParams sampling_params(const std::vector<int64_t>& ids, const std::vector<int64_t>& counters);
  // Zeroes the non-finite rows of logits [T, V] (so sampling proceeds) and returns their flags [T] int64 (1 finite).
  at::Tensor finite_rows(at::Tensor& logits);

  Row& row(int64_t id);
  void step_rows();  // step() without its output tensor (step_output_ holds the pairs)

  EngineConfig config_;
  ModelWeights weights_;
  int64_t huge_page_bytes_ = 0;
  Ops ops_;
  at::Tensor cos_sin_cache_;  // [P, D], P <= max_positions: the positions rows may reach so far
  double attn_scale_;
  Buffers buffers_;
  Profiler profiler_;
  std::map<int64_t, Row> rows_;        // by id
  at::Tensor draft_vocab_;             // [K] int64 token ids of the reduced draft head (undefined: none)
  Matrix draft_head_;                  // [K, H] their LM-head rows, in the head's dtype or block format
  std::vector<bool> slot_used_;        // cache rows in use
  int64_t next_id_ = 0;
  std::vector<int64_t> step_output_;   // (id, token) pairs of the current step
  std::mutex busy_;                    // held by the running call
  struct GraphCache;                   // cuda_graphs.cpp
  std::shared_ptr<GraphCache> graphs_;
  bool use_graphs_ = true;
  int64_t threads_ = 0;                // cap on the threads of the engine's CPU ops (0: none)
};

}  // namespace engine
}  // namespace layerskip
