// Element-type dispatch shared by every CPU kernel: the one place that maps float32 / bfloat16 tensors to the
// C++ types float / c10::BFloat16. The entry point has already checked the dtypes.
#pragma once
#include <torch/all.h>

namespace layerskip {
namespace cpu {

// Calls fn(static_cast<T*>(nullptr)) where T is float or c10::BFloat16, the element type of dtype `a`.
template <typename Fn>
void dispatch_float(at::ScalarType a, Fn&& fn) {
  if (a == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<c10::BFloat16*>(nullptr));
  }
}

// Calls fn(static_cast<A*>(nullptr), static_cast<const B*>(nullptr)) where A and B are float or c10::BFloat16,
// the element types of `a` and `b`.
template <typename Fn>
void dispatch_float_pair(at::ScalarType a, at::ScalarType b, Fn&& fn) {
  dispatch_float(a, [&](auto* a_tag) {
    dispatch_float(b, [&](auto* b_tag) {
      using B = std::remove_pointer_t<decltype(b_tag)>;
      fn(a_tag, static_cast<const B*>(nullptr));
    });
  });
}

// The element type behind a dispatch tag: elem_t<decltype(tag)>.
template <typename Tag>
using elem_t = std::remove_const_t<std::remove_pointer_t<Tag>>;

}  // namespace cpu
}  // namespace layerskip
