// A pool of worker threads for the CPU ops' parallel loops (cpu::parallel_for) in which the calling thread
// never waits for a worker that has not started.
//
// Why: with an OpenMP team, a parallel region ends when every thread of the team has passed its barrier, so
// when another process (or a server's own HTTP event loop) takes a core, the region waits for the descheduled
// worker to get it back: on 2 cores a decode step of 8 rows took 20-47 ms on two threads against 17 on one
// while a server streamed to 8 clients (benchmarks/results_serve.md). Here a region is cut into chunks that the
// caller and any awake worker claim from one shared counter; the region ends when every chunk is done, so a
// worker that is not running costs at most the chunk it holds, and one that wakes late finds nothing left.
//
//   WorkPool::instance().run(chunks, helpers, [&](int64_t chunk) { ... });   // chunks in [0, chunks)
//
// Workers are started on first use (up to the number asked for, at most 255; detached, never destroyed: process
// exit ends them, and a forked child starts its own). A region wakes only the workers it may use; each spins
// briefly on its own wake-up word after a region (~40 us) before sleeping on it (a futex), so that the
// back-to-back regions of a decode step do not pay a wake-up each. One region
// at a time: a second thread calling run while a region is running, and a region's own chunks calling run
// (nested loops), run their chunks inline on the calling thread. An exception thrown by a chunk on a worker is
// rethrown by run on the calling thread once the region is over.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace layerskip {
namespace cpu {

class WorkPool {
 public:
  static WorkPool& instance();

  // Runs f(c) for every chunk c in [0, chunks), on the calling thread and up to `helpers` workers; returns
  // when all are done, rethrowing the first exception a chunk threw.
  void run(int64_t chunks, int helpers, const std::function<void(int64_t)>& f);

  // In a forked child: the parent's workers do not exist there; start afresh.
  void forget_workers();

 private:
  WorkPool() = default;
  void ensure_workers(int n);
  void worker_loop(int index);
  // Claims and runs chunks of region `region` until none is left (or another region has started).
  void work_on(uint32_t region);

  static constexpr int kMaxWorkers = 255;  // helpers beyond this are not used

  // One wake-up word per worker, on its own cache line: a region wakes only the workers it may use (the others,
  // asleep, stay so), and a worker spins on its own line.
  struct alignas(64) Slot {
    std::atomic<uint32_t> go{0};  // the number of the last region this worker was asked to join
    std::atomic<uint32_t> sleeping{0};  // 1 while the worker sleeps (or is about to) on `go`'s futex
  };

  std::mutex region_mutex_;  // one region at a time
  std::mutex start_mutex_;   // guards workers_
  int workers_ = 0;          // started (detached) workers
  Slot slots_[kMaxWorkers];
  // (region number << 32) | next unclaimed chunk: a claim succeeds only within its own region
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};  // chunks of the current region finished
  // the current region's work and size, set before claim_ publishes the region (atomic: a worker of the
  // previous region may read them while they change, and then fails its claim)
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> chunks_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the first exception a chunk of the current region threw
  uint32_t region_ = 0;
};

}  // namespace cpu
}  // namespace layerskip
