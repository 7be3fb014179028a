// Typed dispatcher handles of the layerskip ops the engine calls.
//
// Every op goes through c10::Dispatcher, so the kernel registered for the tensors' device runs (CPU
// today, CUDA when csrc/cuda/ registers it): the decoder loop never names a backend. The handles are
// looked up once, when the engine is built. Every op writes into outputs the engine owns.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/all.h>

namespace layerskip {
namespace engine {

struct Ops {
  using Tensor = at::Tensor;
  using C = const Tensor&;
  c10::TypedOperatorHandle<void(Tensor&, C, C, double)> rms_norm;
  c10::TypedOperatorHandle<void(Tensor&, C, Tensor&, C, double)> fused_add_rms_norm;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, C, C)> rotary_embedding;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, C, C, C, C)> kv_cache_write;
  c10::TypedOperatorHandle<void(Tensor&, C, C, C, C, C, double)> attention;
  c10::TypedOperatorHandle<void(Tensor&, C)> silu_and_mul;
  c10::TypedOperatorHandle<void(Tensor&, C, C)> linear;
  // packed GGUF blocks (CPU): linear_quantized.out(input, packed, format, N, K, out), dequantize_rows
  c10::TypedOperatorHandle<Tensor&(C, C, int64_t, int64_t, int64_t, Tensor&)> linear_quantized;
  c10::TypedOperatorHandle<Tensor(C, int64_t, int64_t, int64_t, C)> dequantize_rows;
  c10::TypedOperatorHandle<void(Tensor&, C, C, C, C)> sampling_probs;
  c10::TypedOperatorHandle<void(Tensor&, C, C, C)> sample_from_probs;
  c10::TypedOperatorHandle<void(Tensor&, C, C, C, C, C, C)> sample;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, C, C, C)> speculative_accept_greedy;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, C, C, C, C, C, C)> speculative_accept;

  // Looks every op up by name; throws if one is not registered.
  static Ops lookup() {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&](const char* name, const char* overload = "") { return d.findSchemaOrThrow(name, overload); };
    return Ops{
        find("layerskip::rms_norm").typed<void(Tensor&, C, C, double)>(),
        find("layerskip::fused_add_rms_norm").typed<void(Tensor&, C, Tensor&, C, double)>(),
        find("layerskip::rotary_embedding").typed<void(Tensor&, Tensor&, C, C)>(),
        find("layerskip::kv_cache_write").typed<void(Tensor&, Tensor&, C, C, C, C)>(),
        find("layerskip::attention").typed<void(Tensor&, C, C, C, C, C, double)>(),
        find("layerskip::silu_and_mul").typed<void(Tensor&, C)>(),
        find("layerskip::linear").typed<void(Tensor&, C, C)>(),
        find("layerskip::linear_quantized", "out").typed<Tensor&(C, C, int64_t, int64_t, int64_t, Tensor&)>(),
        find("layerskip::dequantize_rows").typed<Tensor(C, int64_t, int64_t, int64_t, C)>(),
        find("layerskip::sampling_probs").typed<void(Tensor&, C, C, C, C)>(),
        find("layerskip::sample_from_probs").typed<void(Tensor&, C, C, C)>(),
        find("layerskip::sample").typed<void(Tensor&, C, C, C, C, C, C)>(),
        find("layerskip::speculative_accept_greedy").typed<void(Tensor&, Tensor&, C, C, C)>(),
        find("layerskip::speculative_accept").typed<void(Tensor&, Tensor&, C, C, C, C, C, C)>(),
    };
  }
};

}  // namespace engine
}  // namespace layerskip
