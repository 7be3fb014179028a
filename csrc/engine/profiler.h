// Optional per-category wall-clock timers of the decoder loop (off by default).
//
// When enabled, each timed region adds its elapsed time to a category, which gives the per-token
// breakdown of benchmarks/bench_generate.py (layers, LM head, attention, sampling, loop overhead).
// The clock is read on the host: on an asynchronous device (CUDA) the figures are launch times, not
// kernel times; on the CPU every op is synchronous and the figures are exact. Disabled, a region
// costs one branch.
#pragma once
#include <array>
#include <chrono>
#include <string>

namespace layerskip {
namespace engine {

enum class Cat : int {
  embed,
  norm,
  qkv_proj,
  rotary_kv,
  attention,
  o_proj,
  mlp_proj,
  silu,
  lm_head,
  sampling,
  accept,
  count
};

inline const char* cat_name(Cat c) {
  static const char* names[] = {"embed",   "norm",    "qkv_proj", "rotary_kv", "attention", "o_proj",
                                "mlp_proj", "silu",   "lm_head",  "sampling",  "accept"};
  return names[static_cast<int>(c)];
}

class Profiler {
 public:
  using Clock = std::chrono::steady_clock;
  bool enabled = false;
  std::array<double, static_cast<int>(Cat::count)> seconds{};

  void reset() { seconds.fill(0.0); }

  // Adds the time since construction to a category when the profiler is enabled.
  class Scope {
   public:
    Scope(Profiler& p, Cat c) : p_(p), c_(c) {
      if (p_.enabled) t0_ = Clock::now();
    }
    ~Scope() {
      if (p_.enabled) p_.seconds[static_cast<int>(c_)] += std::chrono::duration<double>(Clock::now() - t0_).count();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Profiler& p_;
    Cat c_;
    Clock::time_point t0_;
  };
};

}  // namespace engine
}  // namespace layerskip
