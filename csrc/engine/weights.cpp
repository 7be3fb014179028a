// Builds ModelWeights from HF-named tensors: name and shape checks, q|k|v and gate|up fusion, dtype conversion.
#include "engine/weights.h"

#include <optional>
#include <set>
#include <string>

namespace layerskip {
namespace engine {

namespace {

at::Tensor as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// Looks up, checks and marks one named weight.
class Lookup {
 public:
  explicit Lookup(const c10::Dict<std::string, at::Tensor>& tensors) : tensors_(tensors) {}

  bool has(const std::string& name) const { return tensors_.contains(name); }

  at::Tensor get(const std::string& name, at::IntArrayRef expected) {
    TORCH_CHECK(has(name), "Engine: weight ", name, " is missing");
    used_.insert(name);
    const at::Tensor t = tensors_.at(name);
    TORCH_CHECK(t.defined(), "Engine: weight ", name, " is undefined");
    TORCH_CHECK(t.sizes() == expected, "Engine: weight ", name, " must have shape ", expected, ", got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "Engine: weight ", name, " must be floating point, got ",
                t.scalar_type());
    if (!device_) device_ = t.device();
    TORCH_CHECK(t.device() == *device_, "Engine: all weights must be on one device; ", name, " is on ", t.device(),
                ", others on ", *device_);
    return t;
  }

  // Every given name was used.
  void check_all_used() const {
    for (const auto& item : tensors_) {
      TORCH_CHECK(used_.count(item.key()), "Engine: unexpected weight ", item.key(),
                  " (not a weight of this model's configuration)");
    }
  }

 private:
  const c10::Dict<std::string, at::Tensor>& tensors_;
  std::set<std::string> used_;
  std::optional<at::Device> device_;
};

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

ModelWeights build_weights(const ModelShape& s, const c10::Dict<std::string, at::Tensor>& tensors,
                           at::ScalarType matmul_dtype) {
  TORCH_CHECK(matmul_dtype == at::kFloat || matmul_dtype == at::kBFloat16,
              "Engine: weight dtype must be float32 or bfloat16, got ", matmul_dtype);
  const int64_t H = s.hidden, I = s.intermediate, V = s.vocab, Q = s.q_size(), KV = s.kv_size();
  Lookup w(tensors);
  ModelWeights out;
  out.embed = as(w.get("model.embed_tokens.weight", {V, H}), at::kFloat);
  out.final_norm = as(w.get("model.norm.weight", {H}), at::kFloat);
  if (w.has("lm_head.weight")) {
    out.lm_head = as(w.get("lm_head.weight", {V, H}), matmul_dtype);
  } else {  // tied: the embedding's storage when float32
    out.lm_head = matmul_dtype == at::kFloat ? out.embed : as(out.embed, matmul_dtype);
  }
  out.layers.reserve(s.num_layers);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights l;
    l.input_norm = as(w.get(p + "input_layernorm.weight", {H}), at::kFloat);
    l.qkv = as(at::cat({w.get(p + "self_attn.q_proj.weight", {Q, H}), w.get(p + "self_attn.k_proj.weight", {KV, H}),
                        w.get(p + "self_attn.v_proj.weight", {KV, H})},
                       0),
               matmul_dtype);  // [(Hq + 2 Hkv) D, H]
    l.o = as(w.get(p + "self_attn.o_proj.weight", {H, Q}), matmul_dtype);
    l.post_attn_norm = as(w.get(p + "post_attention_layernorm.weight", {H}), at::kFloat);
    l.gate_up = as(at::cat({w.get(p + "mlp.gate_proj.weight", {I, H}), w.get(p + "mlp.up_proj.weight", {I, H})}, 0),
                   matmul_dtype);  // [2I, H]
    l.down = as(w.get(p + "mlp.down_proj.weight", {H, I}), matmul_dtype);
    out.layers.push_back(std::move(l));
  }
  w.check_all_used();
  return out;
}

}  // namespace engine
}  // namespace layerskip
