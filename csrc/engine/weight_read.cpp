// Engine::weight_read_seconds: the time of one plain read of every weight byte a decode step reads, from the
// engine's own pages, on its threads: the memory roofline of this engine, measured where its weights live
// (a fresh buffer may sit in faster or slower memory than they do: on our VMs torch.sum over fresh 1 GiB
// buffers read 33-67 GB/s from one allocation to the next).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "engine/engine.h"

namespace layerskip {
namespace engine {

namespace {

// OR of the 64-bit words of [p, p + bytes) (bytes a multiple of 8 read as words, the rest as bytes): a read
// the compiler vectorizes, with one operation per loaded vector.
uint64_t or_reduce(const char* p, int64_t bytes) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t words = bytes / 8;
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  int64_t i = 0;
  for (; i + 8 <= words; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] |= w[i + j];
  }
  uint64_t r = 0;
  for (int j = 0; j < 8; ++j) r |= acc[j];
  for (; i < words; ++i) r |= w[i];
  for (int64_t b = words * 8; b < bytes; ++b) r |= static_cast<unsigned char>(p[b]);
  return r;
}

}  // namespace

double Engine::weight_read_seconds(int64_t reps) {
  TORCH_CHECK(reps >= 1 && reps <= 1000, "Engine: weight_read_seconds: reps must be in [1, 1000], got ", reps);
  TORCH_CHECK(weights_.device().is_cpu(), "Engine: weight_read_seconds reads CPU memory; this engine is on ",
              weights_.device());
  // the tensors a decode step reads (the embedding's one row aside), cut into chunks of at most 256 KiB
  constexpr int64_t kChunk = int64_t{256} << 10;
  std::vector<std::pair<const char*, int64_t>> chunks;
  for (const at::Tensor& t : weights_.step_tensors()) {
    const char* p = static_cast<const char*>(t.data_ptr());
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    for (int64_t off = 0; off < bytes; off += kChunk) chunks.emplace_back(p + off, std::min(kChunk, bytes - off));
  }
  cpu::ThreadCapGuard cap(threads_);
  std::atomic<uint64_t> sink{0};
  std::vector<double> times;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    cpu::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      uint64_t acc = 0;
      for (int64_t i = b; i < e; ++i) acc |= or_reduce(chunks[i].first, chunks[i].second);
      sink.fetch_or(acc, std::memory_order_relaxed);
    });
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];  // the median
}

}  // namespace engine
}  // namespace layerskip
