// The work-claiming thread pool of the CPU ops (see work_pool.h).
#include "cpu/work_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LAYERSKIP_PAUSE() _mm_pause()
#else
#define LAYERSKIP_PAUSE() std::this_thread::yield()
#endif

namespace layerskip {
namespace cpu {

namespace {

constexpr int kWorkerSpins = 1000;   // pauses (~40 us on Zen 4) a worker waits for the next region before sleeping
constexpr int kCallerSpins = 20000;  // pauses the caller waits for chunks held by others before yielding its core

thread_local bool tls_in_region = false;  // this thread is running a region's chunk (or is its caller)

// Sleeps until `word` no longer holds `seen` (a Linux futex on the word: what C++20's atomic wait does, kept to
// C++17 so that the extension compiles with the C++ standard of whichever torch it builds against).
void futex_wait_while(std::atomic<uint32_t>& word, uint32_t seen) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "a futex is one 32-bit word");
  while (word.load(std::memory_order_acquire) == seen) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
  }
}

void futex_wake_one(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

}  // namespace

WorkPool& WorkPool::instance() {
  static WorkPool* pool = [] {
    auto* p = new WorkPool();  // never destroyed: its detached workers may outlive static destructors
    pthread_atfork(nullptr, nullptr, [] { instance().forget_workers(); });
    return p;
  }();
  return *pool;
}

void WorkPool::forget_workers() { workers_ = 0; }

void WorkPool::ensure_workers(int n) {
  std::lock_guard<std::mutex> lock(start_mutex_);
  for (; workers_ < n; ++workers_) {
    const int index = workers_;
    std::thread([this, index] { worker_loop(index); }).detach();
  }
}

void WorkPool::work_on(uint32_t region) {
  uint64_t c = claim_.load(std::memory_order_acquire);
  while (static_cast<uint32_t>(c >> 32) == region) {
    const int64_t chunk = static_cast<int64_t>(c & 0xFFFFFFFFu);
    // acquire: a chunk count written for a later region is seen only with that region's closing of this
    // one (run's first claim_ store), so the claim below then fails instead of taking a chunk number that
    // is valid only in the later region
    if (chunk >= chunks_.load(std::memory_order_acquire)) return;
    if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) {
      // the region cannot end (nor fn_ change) before this chunk is counted done
      try {
        (*fn_.load(std::memory_order_relaxed))(chunk);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      c = claim_.load(std::memory_order_acquire);
    }
  }
}

void WorkPool::worker_loop(int index) {
  std::atomic<uint32_t>& go = slots_[index].go;
  uint32_t seen = go.load(std::memory_order_acquire);
  for (;;) {
    uint32_t now = go.load(std::memory_order_acquire);
    for (int i = 0; now == seen && i < kWorkerSpins; ++i) {
      LAYERSKIP_PAUSE();
      now = go.load(std::memory_order_acquire);
    }
    if (now == seen) {
      // announce the sleep before the last look at `go` (both seq_cst): either this load sees the caller's new
      // region, or the caller's load of `sleeping` after its store sees 1 and wakes the futex
      slots_[index].sleeping.store(1, std::memory_order_seq_cst);
      if (go.load(std::memory_order_seq_cst) == seen) futex_wait_while(go, seen);
      slots_[index].sleeping.store(0, std::memory_order_relaxed);
      now = go.load(std::memory_order_acquire);
    }
    seen = now;
    tls_in_region = true;
    work_on(now);
    tls_in_region = false;
  }
}

void WorkPool::run(int64_t chunks, int helpers, const std::function<void(int64_t)>& f) {
  if (chunks <= 0) return;
  std::unique_lock<std::mutex> lock(region_mutex_, std::defer_lock);
  if (helpers <= 0 || chunks == 1 || chunks >= (int64_t{1} << 31) || tls_in_region || !lock.try_lock()) {
    for (int64_t c = 0; c < chunks; ++c) f(c);  // inline: no helpers, nested, or another region is running
    return;
  }
  helpers = std::min(helpers, kMaxWorkers);
  ensure_workers(helpers);
  const uint32_t region = ++region_;
  // Close the previous region before changing fn_ and chunks_: a late worker of it may hold a claim word
  // of that region whose chunk number is past its end; were the new, larger chunk count visible to it while
  // that claim word was still current, its claim would succeed and run a chunk of the new region twice (seen
  // on a CI machine). After this store no claim of an earlier region can succeed, and none of this one can
  // either (no chunk number reaches 0xFFFFFFFF) until the region is published below.
  claim_.store((static_cast<uint64_t>(region) << 32) | 0xFFFFFFFFu, std::memory_order_seq_cst);
  fn_.store(&f, std::memory_order_relaxed);
  chunks_.store(chunks, std::memory_order_release);
  error_ = nullptr;
  done_.store(0, std::memory_order_relaxed);
  claim_.store(static_cast<uint64_t>(region) << 32, std::memory_order_release);
  for (int i = 0; i < helpers; ++i) {  // only the workers this region may use
    slots_[i].go.store(region, std::memory_order_seq_cst);
    if (slots_[i].sleeping.load(std::memory_order_seq_cst)) futex_wake_one(slots_[i].go);  // a spinning one sees it
  }
  tls_in_region = true;
  work_on(region);
  tls_in_region = false;
  // chunks other threads claimed: wait for them, spinning first, then giving the core to whoever holds one
  for (int i = 0; done_.load(std::memory_order_acquire) < chunks; ++i) {
    if (i < kCallerSpins) {
      LAYERSKIP_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  if (error_) std::rethrow_exception(error_);
}

}  // namespace cpu
}  // namespace layerskip
