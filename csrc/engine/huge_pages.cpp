// Weight matrices copied into one mapping advised for transparent huge pages (see huge_pages.h).
#include "engine/huge_pages.h"

#include <malloc.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace layerskip {
namespace engine {

namespace {

constexpr int64_t kHugePage = int64_t{2} << 20;
constexpr int64_t kAlign = 4096;  // each matrix starts on its own 4 KiB page

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("LAYERSKIP_HUGE_PAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// `bytes` of zeros starting on a 2 MiB boundary in a new mapping advised MADV_HUGEPAGE, owned by the returned
// pointer (unmapped when its last copy goes); null if the mapping fails.
std::shared_ptr<char> map_huge(int64_t bytes) {
  // map one huge page more than needed, to start on a 2 MiB boundary
  const size_t mapped = static_cast<size_t>(bytes + kHugePage);
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  std::shared_ptr<void> mapping(base, [mapped](void* p) { munmap(p, mapped); });
  char* start = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(base), kHugePage));
  madvise(start, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // advice only: 4 KiB pages if refused
  return std::shared_ptr<char>(mapping, start);  // shares the mapping's ownership, points at the aligned start
}

}  // namespace

int64_t place_in_huge_pages(ModelWeights& weights) {
  if (!enabled() || !weights.device().is_cpu()) return 0;
  std::vector<Matrix*> matrices = {&weights.embed, &weights.lm_head};
  for (LayerWeights& l : weights.layers) {
    for (Matrix* m : {&l.qkv, &l.o, &l.gate_up, &l.down}) matrices.push_back(m);
  }
  // offsets by storage address, so that matrices sharing a tensor (a tied head) share the copy
  std::map<const void*, int64_t> offset_of;
  int64_t total = 0;
  for (const Matrix* m : matrices) {
    if (!m->data.defined() || !m->data.is_contiguous() || offset_of.count(m->data.data_ptr())) continue;
    offset_of[m->data.data_ptr()] = total;
    total += round_up(m->bytes(), kAlign);
  }
  if (total == 0) return 0;
  const std::shared_ptr<char> arena = map_huge(total);
  if (!arena) return 0;
  char* start = arena.get();

  std::map<const void*, at::Tensor> copies;  // by the original storage address
  for (Matrix* m : matrices) {
    const auto found = offset_of.find(m->data.defined() ? m->data.data_ptr() : nullptr);
    if (found == offset_of.end()) continue;
    auto copy = copies.find(found->first);
    if (copy == copies.end()) {
      at::Tensor placed = at::from_blob(
          start + found->second, m->data.sizes(), m->data.strides(), [arena](void*) {}, m->data.options());
      placed.copy_(m->data);
      copy = copies.emplace(found->first, placed).first;
    }
    m->data = copy->second;  // the original is freed here unless the caller still holds it
  }
  // Freed matrices of a few MiB went back to glibc's heap (its mmap threshold rises after the first large
  // free), where they would stay resident: hand those pages back to the system (~40 MiB for SmolLM2's Q4_1).
  malloc_trim(0);
  return total;
}

at::Tensor huge_page_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t n : sizes) numel *= n;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (!enabled() || options.device().type() != c10::DeviceType::CPU || bytes < kHugePage) {
    return at::zeros(sizes, options);
  }
  const std::shared_ptr<char> memory = map_huge(bytes);  // a fresh anonymous mapping reads as zeros
  if (!memory) return at::zeros(sizes, options);
  return at::from_blob(memory.get(), sizes, [memory](void*) {}, options);
}

}  // namespace engine
}  // namespace layerskip
