// The transformer forward pass of the engine: embedding, a range of decoder layers, an exit's logits.
//
// A layer over the residual stream x [T, H] (T = 1 for a decode step, d + 1 for a verify block, P for
// the prefill):
//   a   = rms_norm(x)                     (fused with the previous layer's residual add)
//   qkv = linear(a, Wqkv)                 [T, (Hq + 2 Hkv) D]; rotary on q, k; k, v written to the cache
//   x  += linear(attention(q), Wo)        (fused with the post-attention norm)
//   x  += linear(silu_and_mul(linear(a2, Wgate_up)), Wdown)
#include "engine/engine.h"

namespace layerskip {
namespace engine {

void Engine::embed(at::Tensor& out, const at::Tensor& ids) {
  Profiler::Scope s(profiler_, Cat::embed);
  at::index_select_out(out, weights_.embed, 0, ids);  // [T] -> [T, H]
}

void Engine::run_layers(at::Tensor& x, int64_t start, int64_t end, int64_t start_pos) {
  if (start >= end) return;
  const int64_t T = x.size(0), Q = shape_.q_size(), KV = shape_.kv_size();
  const double eps = shape_.rms_norm_eps;
  const at::Tensor positions = buffers_.positions.narrow(0, start_pos, T);  // [T]: positions and cache slots
  at::Tensor a, mlp_out;
  for (int64_t i = start; i < end; ++i) {
    const LayerWeights& w = weights_.layers[i];
    {
      Profiler::Scope s(profiler_, Cat::norm);
      a = i == start ? ops_.rms_norm.call(x, w.input_norm, eps)                 // [T, H]
                     : ops_.fused_add_rms_norm.call(mlp_out, x, w.input_norm, eps);  // x += mlp_out
    }
    at::Tensor qkv;
    {
      Profiler::Scope s(profiler_, Cat::qkv_proj);
      qkv = ops_.linear.call(a, w.qkv);  // [T, (Hq + 2 Hkv) D]
    }
    at::Tensor q = qkv.narrow(1, 0, Q).view({T, shape_.num_heads, shape_.head_dim});         // [T, Hq, D]
    at::Tensor k = qkv.narrow(1, Q, KV).view({T, shape_.num_kv_heads, shape_.head_dim});     // [T, Hkv, D]
    at::Tensor v = qkv.narrow(1, Q + KV, KV).view({T, shape_.num_kv_heads, shape_.head_dim});  // [T, Hkv, D]
    {
      Profiler::Scope s(profiler_, Cat::rotary_kv);
      ops_.rotary_embedding.call(q, k, positions, cos_sin_cache_);
      ops_.kv_cache_write.call(buffers_.k_cache[i], buffers_.v_cache[i], k, v, positions);
    }
    at::Tensor attn;
    {
      Profiler::Scope s(profiler_, Cat::attention);
      attn = ops_.attention.call(q, buffers_.k_cache[i], buffers_.v_cache[i], start_pos, attn_scale_);  // [T, Hq, D]
    }
    at::Tensor o;
    {
      Profiler::Scope s(profiler_, Cat::o_proj);
      o = ops_.linear.call(attn.view({T, Q}), w.o);  // [T, H]
    }
    at::Tensor a2;
    {
      Profiler::Scope s(profiler_, Cat::norm);
      a2 = ops_.fused_add_rms_norm.call(o, x, w.post_attn_norm, eps);  // x += o; [T, H]
    }
    at::Tensor gate_up;
    {
      Profiler::Scope s(profiler_, Cat::mlp_proj);
      gate_up = ops_.linear.call(a2, w.gate_up);  // [T, 2I]
    }
    at::Tensor act;
    {
      Profiler::Scope s(profiler_, Cat::silu);
      act = ops_.silu_and_mul.call(gate_up);  // [T, I]
    }
    {
      Profiler::Scope s(profiler_, Cat::mlp_proj);
      mlp_out = ops_.linear.call(act, w.down);  // [T, H]
    }
  }
  Profiler::Scope s(profiler_, Cat::norm);
  x.add_(mlp_out);
}

at::Tensor Engine::exit_logits(const at::Tensor& x) {
  at::Tensor normed;
  {
    Profiler::Scope s(profiler_, Cat::norm);
    normed = ops_.rms_norm.call(x, weights_.final_norm, shape_.rms_norm_eps);  // [T, H]
  }
  Profiler::Scope s(profiler_, Cat::lm_head);
  return ops_.linear.call(normed, weights_.lm_head);  // [T, V]
}

at::Tensor Engine::pick(const at::Tensor& logits) {
  Profiler::Scope s(profiler_, Cat::sampling);
  // greedy: the op takes the argmax, no softmax over the vocabulary
  at::Tensor token = ops_.sample.call(logits, gen_.temperature, gen_.top_k, gen_.top_p, gen_.seed, gen_.counter);
  gen_.counter += 1;
  return token;  // [1] int64
}

}  // namespace engine
}  // namespace layerskip
