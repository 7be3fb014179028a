// Parallel loops of the CPU ops: at::parallel_for under a cap on the number of threads, set per calling thread.
//
// Why a cap: when other processes keep every core busy, a second worker waits for a core at every parallel
// region and a decode step stalls (benchmarks/results_contention.md: SmolLM2 with two busy processes on two
// cores decodes 1.7x faster on one thread than on two). The engine caps its own calls (Engine::set_threads;
// engine.py drops to one thread while the machine is oversubscribed) without touching torch's global thread
// count, so the user's other torch work keeps it.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace layerskip {
namespace cpu {

// Threads an op may use on this thread's calls; 0: no cap (torch's thread count).
inline thread_local int64_t tls_thread_cap = 0;

// Sets the cap for the scope's lifetime on the calling thread, restoring the previous one on exit. With OpenMP
// it also lowers the calling thread's OpenMP thread count (a per-thread setting), so that the torch ops the
// engine calls (index_select, the prefill's matmuls) keep to the cap too.
class ThreadCapGuard {
 public:
  explicit ThreadCapGuard(int64_t cap) : previous_(tls_thread_cap) {
    tls_thread_cap = cap;
#ifdef _OPENMP
    omp_previous_ = omp_get_max_threads();
    if (cap > 0 && cap < omp_previous_) omp_set_num_threads(static_cast<int>(cap));
#endif
  }
  ~ThreadCapGuard() {
    tls_thread_cap = previous_;
#ifdef _OPENMP
    if (omp_get_max_threads() != omp_previous_) omp_set_num_threads(omp_previous_);
#endif
  }
  ThreadCapGuard(const ThreadCapGuard&) = delete;
  ThreadCapGuard& operator=(const ThreadCapGuard&) = delete;

 private:
  int64_t previous_;
  int omp_previous_ = 1;
};

// at::parallel_for over [begin, end) with at least `grain` items per chunk and at most tls_thread_cap chunks
// (a cap of 1 runs f(begin, end) inline, waking no worker).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t cap = tls_thread_cap;
  if (cap > 0 && end > begin) grain = std::max(grain, (end - begin + cap - 1) / cap);
  at::parallel_for(begin, end, grain, f);
}

}  // namespace cpu
}  // namespace layerskip
