// Builds ModelWeights from HF-named tensors: name and shape checks, q|k|v and gate|up fusion, dtype conversion;
// matrices given as packed GGUF blocks stay packed (fused by stacking their rows, which are whole blocks).
#include "engine/weights.h"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cpu/quant_interleave.h"
#include "cpu/quant_kernels.h"

namespace layerskip {
namespace engine {

namespace {

at::Tensor as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

const char* format_name(int64_t format) {
  switch (quant::base_format(format)) {
    case quant::kQ8_0: return "Q8_0";
    case quant::kQ4_0: return "Q4_0";
    case quant::kQ4_1: return "Q4_1";
    default: return "?";
  }
}

// Looks up, checks and marks one named weight.
class Lookup {
 public:
  Lookup(const c10::Dict<std::string, at::Tensor>& tensors, const c10::Dict<std::string, int64_t>& formats)
      : tensors_(tensors), formats_(formats) {}

  bool has(const std::string& name) const { return tensors_.contains(name); }

  // A float tensor of shape `expected` (norms, or a matrix given as floats).
  at::Tensor get(const std::string& name, at::IntArrayRef expected) {
    const at::Tensor t = fetch(name);
    TORCH_CHECK(!formats_.contains(name), "Engine: weight ", name, " is a vector; only matrices may be packed");
    TORCH_CHECK(t.sizes() == expected, "Engine: weight ", name, " must have shape ", expected, ", got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "Engine: weight ", name, " must be floating point, got ",
                t.scalar_type());
    return t;
  }

  // A matrix [N, K]: float, or packed blocks when `formats` names it.
  Matrix matrix(const std::string& name, int64_t N, int64_t K) {
    if (!formats_.contains(name)) {
      const at::Tensor t = get(name, {N, K});
      return Matrix{t, 0, N, K};
    }
    const at::Tensor t = fetch(name);
    const int64_t format = formats_.at(name), bb = quant::block_bytes(format);
    TORCH_CHECK(bb > 0, "Engine: weight ", name, " has an unsupported block format ", format, " (GGUF types ",
                int64_t{quant::kQ4_0}, " = Q4_0, ", int64_t{quant::kQ4_1}, " = Q4_1, ", int64_t{quant::kQ8_0},
                " = Q8_0)");
    TORCH_CHECK(K % quant::kBlock == 0, "Engine: weight ", name, " has rows of ", K,
                " values, not a multiple of the block size ", quant::kBlock, " of ", format_name(format));
    const int64_t row_bytes = K / quant::kBlock * bb;
    TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == N && t.size(1) == row_bytes,
                "Engine: packed weight ", name, " (", format_name(format), " [", N, ", ", K, "]) must be uint8 [", N,
                ", ", row_bytes, "], got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), "Engine: packed weight ", name, " is on ", t.device(),
                "; packed weights run on the CPU only");
    return Matrix{t.contiguous(), format, N, K};
  }

  // Every given name was used, and every format names a given weight.
  void check_all_used() const {
    for (const auto& item : tensors_) {
      TORCH_CHECK(used_.count(item.key()), "Engine: unexpected weight ", item.key(),
                  " (not a weight of this model's configuration)");
    }
    for (const auto& item : formats_) {
      TORCH_CHECK(tensors_.contains(item.key()), "Engine: a format is given for ", item.key(),
                  ", which is not among the weights");
    }
  }

 private:
  at::Tensor fetch(const std::string& name) {
    TORCH_CHECK(has(name), "Engine: weight ", name, " is missing");
    used_.insert(name);
    const at::Tensor t = tensors_.at(name);
    TORCH_CHECK(t.defined(), "Engine: weight ", name, " is undefined");
    if (!device_) device_ = t.device();
    TORCH_CHECK(t.device() == *device_, "Engine: all weights must be on one device; ", name, " is on ", t.device(),
                ", others on ", *device_);
    return t;
  }

  const c10::Dict<std::string, at::Tensor>& tensors_;
  const c10::Dict<std::string, int64_t>& formats_;
  std::set<std::string> used_;
  std::optional<at::Device> device_;
};

// Rows of several matrices stacked into one [sum N, K] (q|k|v, gate|up): packed ones keep their bytes (all
// parts in one format), float ones become `dtype`.
Matrix stack(const std::vector<Matrix>& parts, at::ScalarType dtype, const std::string& name) {
  std::vector<at::Tensor> data;
  int64_t rows = 0;
  for (const Matrix& m : parts) {
    TORCH_CHECK(m.format == parts[0].format, "Engine: the matrices fused into ", name,
                " must share one format (all float, or all the same block format), got ",
                parts[0].packed() ? format_name(parts[0].format) : "float", " and ",
                m.packed() ? format_name(m.format) : "float");
    data.push_back(m.data);
    rows += m.out_features;
  }
  at::Tensor joined = data.size() == 1 ? data[0] : at::cat(data, 0);
  joined = parts[0].packed() ? joined.contiguous() : as(joined, dtype);
  return Matrix{joined, parts[0].format, rows, parts[0].in_features};
}

// A packed matrix in the GGUF layout -> its interleaved form (quant_interleave.h), the layout the decode kernels
// read 16 rows per instruction from; float matrices as they are. LAYERSKIP_QUANT_INTERLEAVE=0 keeps the GGUF
// layout (for comparisons).
Matrix interleaved(const Matrix& m) {
  static const bool enabled = [] {
    const char* env = std::getenv("LAYERSKIP_QUANT_INTERLEAVE");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!m.packed() || quant::is_interleaved(m.format) || !enabled) return m;
  const at::Tensor src = m.data.contiguous();
  at::Tensor out = at::empty({quant::interleaved_bytes(m.format, m.out_features, m.in_features)},
                             src.options().dtype(at::kByte));
  quant::interleave(m.format, m.out_features, m.in_features, src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>());
  return Matrix{out, quant::kInterleaved + m.format, m.out_features, m.in_features};
}

}  // namespace

Matrix Matrix::rows(const at::Tensor& ids) const {
  if (!quant::is_interleaved(format)) {
    return Matrix{data.index_select(0, ids).contiguous(), format, ids.size(0), in_features};
  }
  // the rows read back in the GGUF layout, then interleaved again
  const at::Tensor idx = ids.to(at::kLong).contiguous();
  const int64_t n = idx.size(0), row_bytes = in_features / quant::kBlock * quant::block_bytes(format);
  at::Tensor rows = at::empty({n, row_bytes}, data.options().dtype(at::kByte));
  const int64_t* id = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < out_features, "Engine: row ", id[i], " out of range [0, ", out_features, ")");
    quant::move_row(format, in_features, id[i], data.data_ptr<uint8_t>(), rows.data_ptr<uint8_t>() + i * row_bytes,
                    true);
  }
  return interleaved(Matrix{rows, quant::base_format(format), n, in_features});
}

std::vector<at::Tensor> ModelWeights::step_tensors() const {
  std::vector<at::Tensor> out = {lm_head.data, final_norm};
  for (const auto& l : layers) {
    for (const at::Tensor& t : {l.input_norm, l.qkv.data, l.o.data, l.post_attn_norm, l.gate_up.data, l.down.data})
      out.push_back(t);
  }
  return out;
}

int64_t ModelWeights::bytes_per_token() const {
  int64_t total = embed.bytes() / std::max<int64_t>(embed.out_features, 1);
  for (const at::Tensor& t : step_tensors()) total += t.numel() * static_cast<int64_t>(t.element_size());
  return total;
}

ModelWeights build_weights(const ModelShape& s, const c10::Dict<std::string, at::Tensor>& tensors,
                           const c10::Dict<std::string, int64_t>& formats, at::ScalarType matmul_dtype) {
  TORCH_CHECK(matmul_dtype == at::kFloat || matmul_dtype == at::kBFloat16,
              "Engine: weight dtype must be float32 or bfloat16, got ", matmul_dtype);
  const int64_t H = s.hidden, I = s.intermediate, V = s.vocab, Q = s.q_size(), KV = s.kv_size();
  Lookup w(tensors, formats);
  ModelWeights out;
  const Matrix embed = w.matrix("model.embed_tokens.weight", V, H);
  out.embed = embed.packed() ? interleaved(embed) : Matrix{as(embed.data, at::kFloat), 0, V, H};
  out.final_norm = as(w.get("model.norm.weight", {H}), at::kFloat);
  if (w.has("lm_head.weight")) {
    out.lm_head = interleaved(stack({w.matrix("lm_head.weight", V, H)}, matmul_dtype, "lm_head.weight"));
  } else if (out.embed.packed() || matmul_dtype == at::kFloat) {  // tied: the embedding's storage
    out.lm_head = out.embed;
  } else {
    out.lm_head = Matrix{as(out.embed.data, matmul_dtype), 0, V, H};
  }
  out.layers.reserve(s.num_layers);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights l;
    l.input_norm = as(w.get(p + "input_layernorm.weight", {H}), at::kFloat);
    l.qkv = interleaved(stack({w.matrix(p + "self_attn.q_proj.weight", Q, H), w.matrix(p + "self_attn.k_proj.weight", KV, H),
                   w.matrix(p + "self_attn.v_proj.weight", KV, H)},
                  matmul_dtype, p + "self_attn.{q,k,v}_proj"));  // [(Hq + 2 Hkv) D, H]
    l.o = interleaved(stack({w.matrix(p + "self_attn.o_proj.weight", H, Q)}, matmul_dtype, p + "self_attn.o_proj"));
    l.post_attn_norm = as(w.get(p + "post_attention_layernorm.weight", {H}), at::kFloat);
    l.gate_up = interleaved(stack({w.matrix(p + "mlp.gate_proj.weight", I, H), w.matrix(p + "mlp.up_proj.weight", I, H)},
                                  matmul_dtype, p + "mlp.{gate,up}_proj"));  // [2I, H]
    l.down = interleaved(stack({w.matrix(p + "mlp.down_proj.weight", H, I)}, matmul_dtype, p + "mlp.down_proj"));
    out.layers.push_back(std::move(l));
  }
  w.check_all_used();
  return out;
}

}  // namespace engine
}  // namespace layerskip
