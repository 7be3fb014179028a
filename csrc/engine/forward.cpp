// The transformer forward pass of the engine: embedding, a range of decoder layers, an exit's logits.
//
// A layer over the residual stream x [T, H] (T tokens from any rows: the active rows of a decode step, their
// verify blocks, or one row's prompt), token t at (rows[t], positions[t]):
//   a   = rms_norm(x)                     (fused with the previous layer's residual add)
//   qkv = linear(a, Wqkv)                 [T, (Hq + 2 Hkv) D]; rotary on q, k; k, v written to the cache
//   x  += linear(attention(q), Wo)        (fused with the post-attention norm)
//   x  += linear(silu_and_mul(linear(a2, Wgate_up)), Wdown)
// Every op writes into the workspace (Buffers::scratch).
#include "engine/engine.h"
#include "ops.h"

namespace layerskip {
namespace engine {

void Engine::embed(at::Tensor& out, const at::Tensor& ids) {
  Profiler::Scope s(profiler_, Cat::embed);
  const Matrix& e = weights_.embed;
  if (e.packed()) {  // the rows dequantized (a few KiB per token)
    out.copy_(ops_.dequantize_rows.call(e.data, e.format, e.out_features, e.in_features, ids));  // [T, H]
  } else {
    at::index_select_out(out, e.data, 0, ids);  // [T] -> [T, H]
  }
}

void Engine::linear(at::Tensor& out, const at::Tensor& x, const Matrix& m, bool batch_invariant) {
  if (m.packed()) {  // batch invariant at any T: each output is one block-by-block sum (quant_kernel_simd.inc)
    ops_.linear_quantized.call(x, m.data, m.format, m.out_features, m.in_features, out);
    return;
  }
  const at::Tensor& w = m.data;
  const int64_t T = x.size(0);
  if (!batch_invariant || T <= kLinearSkinnyMaxTokens) {
    ops_.linear.call(out, x, w);
    return;
  }
  // More rows than the skinny kernel takes: chunks of it, so that each row keeps its reduction order.
  for (int64_t t0 = 0; t0 < T; t0 += kLinearSkinnyMaxTokens) {
    const int64_t n = std::min(kLinearSkinnyMaxTokens, T - t0);
    at::Tensor o = out.narrow(0, t0, n);
    ops_.linear.call(o, x.narrow(0, t0, n), w);
  }
}

void Engine::run_layers(at::Tensor& x, int64_t start, int64_t end, const at::Tensor& rows,
                        const at::Tensor& positions, bool inv) {
  if (start >= end) return;
  const ModelShape& s = config_.shape;
  const int64_t T = x.size(0), H = s.hidden, Q = s.q_size(), KV = s.kv_size(), D = s.head_dim;
  const double eps = s.rms_norm_eps;
  Buffers& b = buffers_;
  at::Tensor a = b.scratch("a", {T, H}), qkv = b.scratch("qkv", {T, Q + 2 * KV});
  at::Tensor attn = b.scratch("attn", {T, s.num_heads, D}), o = b.scratch("o", {T, H});
  at::Tensor gate_up = b.scratch("gate_up", {T, 2 * s.intermediate}), act = b.scratch("act", {T, s.intermediate});
  at::Tensor mlp_out = b.scratch("mlp_out", {T, H});
  at::Tensor q = qkv.narrow(1, 0, Q).view({T, s.num_heads, D});         // [T, Hq, D]
  at::Tensor k = qkv.narrow(1, Q, KV).view({T, s.num_kv_heads, D});     // [T, Hkv, D]
  at::Tensor v = qkv.narrow(1, Q + KV, KV).view({T, s.num_kv_heads, D});  // [T, Hkv, D]
  at::Tensor attn_2d = attn.view({T, Q});
  for (int64_t i = start; i < end; ++i) {
    const LayerWeights& w = weights_.layers[i];
    {
      Profiler::Scope scope(profiler_, Cat::attention);
      if (i == start) {
        ops_.rms_norm.call(a, x, w.input_norm, eps);  // [T, H]
      } else {
        ops_.fused_add_rms_norm.call(a, mlp_out, x, w.input_norm, eps);  // x += mlp_out
      }
      linear(qkv, a, w.qkv, inv);  // [T, (Hq + 2 Hkv) D]
      ops_.rotary_embedding.call(q, k, positions, cos_sin_cache_);
      ops_.kv_cache_write.call(b.k_cache[i], b.v_cache[i], k, v, rows, positions);
      ops_.attention.call(attn, q, b.k_cache[i], b.v_cache[i], rows, positions, attn_scale_);  // [T, Hq, D]
      linear(o, attn_2d, w.o, inv);                                                            // [T, H]
    }
    Profiler::Scope scope(profiler_, Cat::mlp);
    ops_.fused_add_rms_norm.call(a, o, x, w.post_attn_norm, eps);  // x += o; a = norm(x)
    linear(gate_up, a, w.gate_up, inv);                            // [T, 2I]
    ops_.silu_and_mul.call(act, gate_up);                          // [T, I]
    linear(mlp_out, act, w.down, inv);                             // [T, H]
  }
  x.add_(mlp_out);
}

at::Tensor Engine::exit_logits(const at::Tensor& x, const char* name, bool inv) {
  const int64_t T = x.size(0);
  at::Tensor normed = buffers_.scratch("normed", {T, config_.shape.hidden});
  at::Tensor logits = buffers_.scratch(name, {T, config_.shape.vocab});
  Profiler::Scope s(profiler_, Cat::lm_head);
  ops_.rms_norm.call(normed, x, weights_.final_norm, config_.shape.rms_norm_eps);  // [T, H]
  linear(logits, normed, weights_.lm_head, inv);                                  // [T, V]
  return logits;
}

}  // namespace engine
}  // namespace layerskip
