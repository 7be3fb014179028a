// Builds ModelWeights from HF-layout tensors: shape checks, q|k|v and gate|up fusion, dtype conversion.
#include "engine/weights.h"

#include <string>

namespace layerskip {
namespace engine {

namespace {

constexpr int64_t kPerLayer = 9;

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const std::string& name) {
  TORCH_CHECK(t.defined(), "Engine: weight ", name, " is missing");
  TORCH_CHECK(t.sizes() == expected, "Engine: weight ", name, " must have shape ", expected, ", got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "Engine: weight ", name, " must be floating point, got ",
              t.scalar_type());
}

at::Tensor as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

}  // namespace

int64_t ModelWeights::bytes_per_token() const {
  auto bytes = [](const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); };
  int64_t total = bytes(lm_head) + bytes(final_norm) + embed.size(1) * embed.element_size();
  for (const auto& l : layers) {
    total += bytes(l.input_norm) + bytes(l.qkv) + bytes(l.o) + bytes(l.post_attn_norm) + bytes(l.gate_up) +
             bytes(l.down);
  }
  return total;
}

ModelWeights build_weights(const ModelShape& s, const std::vector<at::Tensor>& tensors,
                           at::ScalarType matmul_dtype) {
  TORCH_CHECK(matmul_dtype == at::kFloat || matmul_dtype == at::kBFloat16,
              "Engine: weight dtype must be float32 or bfloat16, got ", matmul_dtype);
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == 3 + kPerLayer * s.num_layers, "Engine: expected ",
              3 + kPerLayer * s.num_layers, " weight tensors (embed, norm, lm_head, then 9 per layer for ",
              s.num_layers, " layers), got ", tensors.size());
  const int64_t H = s.hidden, I = s.intermediate, V = s.vocab, Q = s.q_size(), KV = s.kv_size();
  const auto device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "Engine: all weights must be on one device; weight ", i, " is on ",
                tensors[i].device(), ", the embedding on ", device);
  }
  ModelWeights w;
  check_shape(tensors[0], {V, H}, "model.embed_tokens.weight");
  check_shape(tensors[1], {H}, "model.norm.weight");
  check_shape(tensors[2], {V, H}, "lm_head.weight");
  w.embed = as(tensors[0], at::kFloat);
  w.final_norm = as(tensors[1], at::kFloat);
  const bool tied = tensors[2].is_same(tensors[0]);
  w.lm_head = tied && matmul_dtype == at::kFloat ? w.embed : as(tensors[2], matmul_dtype);
  w.layers.reserve(s.num_layers);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const at::Tensor* t = tensors.data() + 3 + kPerLayer * i;
    const std::string p = "model.layers." + std::to_string(i) + ".";
    check_shape(t[0], {H}, p + "input_layernorm.weight");
    check_shape(t[1], {Q, H}, p + "self_attn.q_proj.weight");
    check_shape(t[2], {KV, H}, p + "self_attn.k_proj.weight");
    check_shape(t[3], {KV, H}, p + "self_attn.v_proj.weight");
    check_shape(t[4], {H, Q}, p + "self_attn.o_proj.weight");
    check_shape(t[5], {H}, p + "post_attention_layernorm.weight");
    check_shape(t[6], {I, H}, p + "mlp.gate_proj.weight");
    check_shape(t[7], {I, H}, p + "mlp.up_proj.weight");
    check_shape(t[8], {H, I}, p + "mlp.down_proj.weight");
    LayerWeights l;
    l.input_norm = as(t[0], at::kFloat);
    l.qkv = as(at::cat({t[1], t[2], t[3]}, 0), matmul_dtype);  // [(Hq + 2 Hkv) D, H]
    l.o = as(t[4], matmul_dtype);
    l.post_attn_norm = as(t[5], at::kFloat);
    l.gate_up = as(at::cat({t[6], t[7]}, 0), matmul_dtype);  // [2I, H]
    l.down = as(t[8], matmul_dtype);
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace engine
}  // namespace layerskip
