// ctest race_work_pool: the CPU ops' work pool (csrc/cpu/work_pool.h) under ThreadSanitizer. Built apart from
// the extension (the pool needs no torch) with -fsanitize=thread, run with halt_on_error: a data race fails the
// test whether or not it corrupted a result in this run (the race fixed in 368e8ad, a late worker claiming a
// chunk of the next region, was reported here in 4 of 5 runs before the fix, while it ran a chunk twice in only
// about one of 25000 regions). Regions alternate few and many chunks with 1-3 helpers; a chunk's exception; two
// threads calling at once. Exit code 0 = pass.
#include <atomic>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu/work_pool.h"

using layerskip::cpu::WorkPool;

int main() {
  std::mt19937 rng(1);
  int failures = 0;
  for (int i = 0; i < 100000; ++i) {
    const int64_t chunks = (i & 1) ? 1 + static_cast<int64_t>(rng() % 3) : 2 + static_cast<int64_t>(rng() % 60);
    const int helpers = 1 + static_cast<int>(rng() % 3);
    std::vector<int> seen(static_cast<size_t>(chunks), 0);  // plain ints: unordered accesses are reported
    WorkPool::instance().run(chunks, helpers, [&](int64_t c) { seen[static_cast<size_t>(c)] += 1; });
    for (int s : seen) {
      if (s != 1) {
        std::printf("FAIL: region %d ran a chunk %d times\n", i, s);
        return 1;
      }
    }
  }

  bool caught = false;
  try {
    WorkPool::instance().run(16, 2, [](int64_t c) {
      if (c == 5) throw std::runtime_error("chunk 5");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  if (!caught) {
    std::printf("FAIL: a chunk's exception was not rethrown\n");
    ++failures;
  }

  std::atomic<int64_t> total{0};
  auto many = [&] {
    for (int i = 0; i < 300; ++i) WorkPool::instance().run(6, 2, [&](int64_t c) { total.fetch_add(c); });
  };
  std::thread a(many), b(many);
  a.join();
  b.join();
  if (total.load() != 2 * 300 * 15) {
    std::printf("FAIL: two calling threads summed %lld\n", static_cast<long long>(total.load()));
    ++failures;
  }
  std::printf(failures ? "%d failure(s)\n" : "work pool under ThreadSanitizer: all checks passed\n", failures);
  return failures ? 1 : 0;
}
