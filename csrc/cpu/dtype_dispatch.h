// Element-type dispatch shared by the CPU kernels whose two tensor arguments are each float32 or bfloat16
// (activations and a parameter or cache): one place that maps the pair of dtypes to C++ types.
#pragma once
#include <torch/all.h>

namespace layerskip {
namespace cpu {

// Calls fn(static_cast<A*>(nullptr), static_cast<const B*>(nullptr)) where A and B are float or c10::BFloat16,
// the element types of `a` and `b`. The entry point has already checked both are float32 or bfloat16.
template <typename Fn>
void dispatch_float_pair(at::ScalarType a, at::ScalarType b, Fn&& fn) {
  const bool a32 = a == at::kFloat;
  const bool b32 = b == at::kFloat;
  if (a32 && b32) {
    fn(static_cast<float*>(nullptr), static_cast<const float*>(nullptr));
  } else if (a32) {
    fn(static_cast<float*>(nullptr), static_cast<const c10::BFloat16*>(nullptr));
  } else if (b32) {
    fn(static_cast<c10::BFloat16*>(nullptr), static_cast<const float*>(nullptr));
  } else {
    fn(static_cast<c10::BFloat16*>(nullptr), static_cast<const c10::BFloat16*>(nullptr));
  }
}

}  // namespace cpu
}  // namespace layerskip
