// Typed dispatcher handles of the layerskip ops the engine calls.
//
// Every op goes through c10::Dispatcher, so the kernel registered for the tensors' device runs (CPU
// today, CUDA when csrc/cuda/ registers it): the decoder loop never names a backend. The handles are
// looked up once, when the engine is built.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/all.h>

#include <tuple>

namespace layerskip {
namespace engine {

struct Ops {
  using Tensor = at::Tensor;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double)> rms_norm;
  c10::TypedOperatorHandle<Tensor(const Tensor&, Tensor&, const Tensor&, double)> fused_add_rms_norm;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, const Tensor&, const Tensor&)> rotary_embedding;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&)> kv_cache_write;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double)> attention;
  c10::TypedOperatorHandle<Tensor(const Tensor&)> silu_and_mul;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> linear;
  c10::TypedOperatorHandle<Tensor(const Tensor&, double, int64_t, double)> sampling_probs;
  c10::TypedOperatorHandle<Tensor(const Tensor&, int64_t, int64_t)> sample_from_probs;
  c10::TypedOperatorHandle<Tensor(const Tensor&, double, int64_t, double, int64_t, int64_t)> sample;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)> speculative_accept_greedy;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t)>
      speculative_accept;

  // Looks every op up by name; throws if one is not registered.
  static Ops lookup() {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&](const char* name) { return d.findSchemaOrThrow(name, ""); };
    return Ops{
        find("layerskip::rms_norm").typed<Tensor(const Tensor&, const Tensor&, double)>(),
        find("layerskip::fused_add_rms_norm").typed<Tensor(const Tensor&, Tensor&, const Tensor&, double)>(),
        find("layerskip::rotary_embedding").typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&)>(),
        find("layerskip::kv_cache_write")
            .typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&)>(),
        find("layerskip::attention").typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double)>(),
        find("layerskip::silu_and_mul").typed<Tensor(const Tensor&)>(),
        find("layerskip::linear").typed<Tensor(const Tensor&, const Tensor&)>(),
        find("layerskip::sampling_probs").typed<Tensor(const Tensor&, double, int64_t, double)>(),
        find("layerskip::sample_from_probs").typed<Tensor(const Tensor&, int64_t, int64_t)>(),
        find("layerskip::sample").typed<Tensor(const Tensor&, double, int64_t, double, int64_t, int64_t)>(),
        find("layerskip::speculative_accept_greedy")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>(),
        find("layerskip::speculative_accept")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t)>(),
    };
  }
};

}  // namespace engine
}  // namespace layerskip
