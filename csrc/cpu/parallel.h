// Parallel loops of the CPU ops: the work-claiming pool (work_pool.h: the caller never waits for a worker that
// is not running), under a cap on the number of threads, set per calling thread.
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
#include <cstdlib>
#include <cstring>

#include "cpu/work_pool.h"
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

// LAYERSKIP_WORK_POOL=0 (read once) runs the loops on at::parallel_for (ATen's OpenMP team) instead.
inline bool use_work_pool() {
  static const bool on = [] {
    const char* env = std::getenv("LAYERSKIP_WORK_POOL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

constexpr int64_t kChunksPerThread = 4;  // chunks of a loop per thread: what a descheduled worker may hold up

// f(b, e) over sub-ranges of [begin, end) of at least `grain` items, on at most tls_thread_cap threads (0: torch's
// thread count; a cap of 1 runs f(begin, end) inline, waking no worker). Chunk sizes are multiples of 16 where
// they are at least 16 (the kernels take weight rows in blocks of up to 16).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  const int64_t cap = tls_thread_cap;
  if (!use_work_pool()) {
    if (cap > 0) grain = std::max(grain, (end - begin + cap - 1) / cap);
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t torch_threads = at::get_num_threads();
  const int64_t threads = cap > 0 ? std::min(cap, torch_threads) : torch_threads;
  const int64_t range = end - begin;
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || range <= grain) {
    f(begin, end);
    return;
  }
  int64_t size = std::max(grain, (range + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  if (size >= 16) size = (size + 15) / 16 * 16;
  const int64_t chunks = (range + size - 1) / size;
  WorkPool::instance().run(chunks, static_cast<int>(threads - 1), [&](int64_t c) {
    const int64_t b = begin + c * size;
    f(b, std::min(end, b + size));
  });
}

}  // namespace cpu
}  // namespace layerskip
