// ctest: the CPU ops' work-claiming pool (csrc/cpu/work_pool.h) and cpu::parallel_for on it. Every chunk runs
// exactly once, whatever the chunk and helper counts; sub-ranges tile the range; nested loops and two threads
// calling at once run inline without deadlock; a chunk's exception reaches the caller; a busy-looping thread
// on every core does not stop a region from finishing; a forked child gets workers of its own.
// Exit code 0 = pass.
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/work_pool.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

using layerskip::cpu::WorkPool;

// Each chunk of `chunks` counted once, for `helpers` helpers.
bool every_chunk_once(int64_t chunks, int helpers) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(chunks));
  WorkPool::instance().run(chunks, helpers, [&](int64_t c) { seen[static_cast<size_t>(c)].fetch_add(1); });
  for (auto& s : seen) {
    if (s.load() != 1) return false;
  }
  return true;
}

// cpu::parallel_for's sub-ranges tile [begin, end) exactly, each at least `grain` long but the last.
bool tiles(int64_t begin, int64_t end, int64_t grain) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(end - begin));
  std::atomic<bool> short_chunk{false};
  layerskip::cpu::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (e - b < grain && e != end) short_chunk = true;
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i - begin)].fetch_add(1);
  });
  for (auto& s : seen) {
    if (s.load() != 1) return false;
  }
  return !short_chunk;
}

}  // namespace

int main() {
  at::set_num_threads(2);
  std::mt19937 rng(1);
  for (int i = 0; i < 3000; ++i) {  // many back-to-back regions, as a decode step runs them
    const int64_t chunks = 1 + static_cast<int64_t>(rng() % 40);
    const int helpers = static_cast<int>(rng() % 4);
    if (!every_chunk_once(chunks, helpers)) {
      check(false, "every chunk exactly once");
      break;
    }
  }
  // Late workers: regions alternating few and many chunks, more helpers than cores, a busy thread taking a
  // core now and then. A worker still claiming in a region that has just ended must not take a chunk of the
  // next one (before the fix, a chunk of 13 in 300000 such regions ran twice; this check failed on CI).
  {
    std::atomic<bool> stop{false};
    std::thread hog([&] {
      while (!stop.load()) {
      }
    });
    int64_t bad = 0;
    for (int i = 0; i < 1000000 && bad == 0; ++i) {
      const int64_t chunks = (i & 1) ? 1 + static_cast<int64_t>(rng() % 3) : 2 + static_cast<int64_t>(rng() % 60);
      if (!every_chunk_once(chunks, 1 + static_cast<int>(rng() % 3))) ++bad;
    }
    stop = true;
    hog.join();
    check(bad == 0, "every chunk exactly once with late workers");
  }
  for (int64_t n : {1, 2, 15, 16, 17, 100, 1000, 4097}) {
    for (int64_t grain : {1, 3, 16, 64, 5000}) check(tiles(7, 7 + n, grain), "parallel_for tiles the range");
  }

  // nested: a chunk that starts a loop of its own runs it inline
  std::atomic<int64_t> nested{0};
  WorkPool::instance().run(8, 1, [&](int64_t) {
    WorkPool::instance().run(5, 1, [&](int64_t c) { nested.fetch_add(c + 1); });
  });
  check(nested.load() == 8 * 15, "nested regions");

  // two threads calling at once: one region at a time, the other runs inline
  std::atomic<int64_t> total{0};
  auto many = [&] {
    for (int i = 0; i < 500; ++i) WorkPool::instance().run(6, 1, [&](int64_t c) { total.fetch_add(c); });
  };
  std::thread a(many), b(many);
  a.join();
  b.join();
  check(total.load() == 2 * 500 * 15, "two calling threads");

  // an exception from a chunk reaches the caller, and the pool stays usable
  bool caught = false;
  try {
    WorkPool::instance().run(16, 1, [&](int64_t c) {
      if (c == 11) throw std::runtime_error("chunk 11");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  check(caught, "a chunk's exception is rethrown");
  check(every_chunk_once(16, 1), "usable after an exception");

  // busy threads on every core: regions still finish (the caller takes the chunks no running worker claims)
  std::atomic<bool> stop{false};
  std::vector<std::thread> hogs;
  for (unsigned i = 0; i < std::max(2u, std::thread::hardware_concurrency()); ++i) {
    hogs.emplace_back([&] {
      while (!stop.load()) {
      }
    });
  }
  const auto t0 = std::chrono::steady_clock::now();
  bool all = true;
  for (int i = 0; i < 200; ++i) all = all && every_chunk_once(8, 1);
  stop = true;
  for (auto& t : hogs) t.join();
  check(all, "regions under load");
  std::printf("200 regions with every core busy: %.1f ms\n",
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());

  // a forked child (no parent workers there) runs regions to the end
  const pid_t pid = fork();
  if (pid == 0) _exit(every_chunk_once(32, 1) && every_chunk_once(7, 3) ? 0 : 1);
  int status = 0;
  waitpid(pid, &status, 0);
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "regions in a forked child");

  std::printf(failures ? "%d failure(s)\n" : "work pool: all checks passed\n", failures);
  return failures ? 1 : 0;
}
