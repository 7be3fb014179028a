// Optional per-category wall-clock timers of the decoder loop (off by default).
//
// Coarse on purpose: a layer is timed as two blocks (attention, MLP), so the layer code stays readable; the
// categories give the per-token breakdown of benchmarks/bench_generate.py. The clock is read on the host: on
// an asynchronous device (CUDA) the figures are launch times, not kernel times; on the CPU every op is
// synchronous and the figures are exact. Disabled, a region costs one branch.
#pragma once
#include <array>
#include <chrono>

namespace layerskip {
namespace engine {

enum class Cat : int { embed, attention, mlp, lm_head, sampling, accept, count };

inline const char* cat_name(Cat c) {
  static const char* names[] = {"embed", "attention", "mlp", "lm_head", "sampling", "accept"};
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
