// Run-time choice among a CPU op's SIMD kernels (linear, linear_quantized): the best one this CPU supports, or
// the one an environment variable or a setter names. One statement of the rule, so both ops behave alike.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace layerskip {
namespace cpu {

template <class Fn>
struct KernelChoice {
  const char* name;
  Fn fn;
  bool supported;
};

template <class Fn>
class KernelSelector {
 public:
  // what: the op's kernel family in messages ("linear", "quant"); env: the variable that may name a kernel;
  // kernels: best first, each with whether this CPU runs it.
  KernelSelector(const char* what, const char* env, std::vector<KernelChoice<Fn>> kernels)
      : what_(what), env_(env), kernels_(std::move(kernels)) {}

  // "auto": the best supported kernel; else the kernel of that name, which this CPU must support.
  const KernelChoice<Fn>* find(const std::string& name) const {
    if (name == "auto") {
      for (const auto& k : kernels_)
        if (k.supported) return &k;
    }
    std::string expected = "auto";
    for (size_t i = 0; i < kernels_.size(); ++i) {
      const auto& k = kernels_[i];
      if (name == k.name) {
        TORCH_CHECK(k.supported, what_, " kernel '", name, "' is not supported by this CPU (supported: ",
                    c10::Join(", ", supported_names()), ")");
        return &k;
      }
      expected += (i + 1 == kernels_.size() ? " or " : ", ") + std::string(k.name);
    }
    TORCH_CHECK(false, "unknown ", what_, " kernel '", name, "': expected ", expected);
  }

  // The kernel in use: the one set last, else the environment variable's, else "auto".
  const KernelChoice<Fn>* current() {
    const KernelChoice<Fn>* k = current_.load(std::memory_order_acquire);
    if (k != nullptr) return k;
    std::call_once(once_, [this] {
      const char* env = std::getenv(env_);
      const KernelChoice<Fn>* chosen = find(env != nullptr && *env != '\0' ? env : "auto");
      const KernelChoice<Fn>* expected = nullptr;
      current_.compare_exchange_strong(expected, chosen);  // a set() that came first wins
    });
    return current_.load(std::memory_order_acquire);
  }

  void set(const std::string& name) { current_.store(find(name), std::memory_order_release); }

  std::vector<std::string> supported_names() const {
    std::vector<std::string> names;
    for (const auto& k : kernels_)
      if (k.supported) names.emplace_back(k.name);
    return names;
  }

 private:
  const char* what_;
  const char* env_;
  std::vector<KernelChoice<Fn>> kernels_;
  std::atomic<const KernelChoice<Fn>*> current_{nullptr};
  std::once_flag once_;
};

}  // namespace cpu
}  // namespace layerskip
