// The engine's weight matrices (and its KV caches) in anonymous mappings advised for transparent huge pages
// (2 MiB).
//
// Why: a decode step streams every weight once. With 4 KiB pages, SmolLM2's 270 MB of bf16 weights span 66,000
// pages per token: the TLB misses and the hardware prefetchers, which stop at 4 KiB page boundaries, cost
// 5-35% of the step (single thread, bf16 [30000, 576] out of cache: T = 4 rows 30.2 -> 37.6 GB/s, T = 8 18.3 ->
// 21.5; fp32 T = 1 35.2 -> 39.7). PyTorch's allocator gets 4 KiB pages on machines whose THP setting is
// "madvise" (the default of many distributions), so the engine asks for huge pages itself.
#pragma once
#include "engine/weights.h"

namespace layerskip {
namespace engine {

// Copies every CPU matrix of `weights` (the embedding, the LM head and each layer's matmul weights; tensors
// shared between them, as a tied head, stay shared) into one 2 MiB-aligned mapping advised MADV_HUGEPAGE and
// points the matrices at the copies; the mapping lives as long as any of them. Values are unchanged. Does
// nothing on other devices, when the mapping fails, or when LAYERSKIP_HUGE_PAGES=0 (read once; for
// comparisons). Returns the bytes placed.
int64_t place_in_huge_pages(ModelWeights& weights);

// A zero-filled tensor; on the CPU, of 2 MiB or more and unless LAYERSKIP_HUGE_PAGES=0, in its own anonymous
// mapping advised MADV_HUGEPAGE, whose pages become resident only when first written (the KV caches: a row's
// cache is read in runs of positions that 4 KiB pages cut into many TLB entries, and its unused capacity
// costs no memory). Otherwise at::zeros.
at::Tensor huge_page_zeros(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace engine
}  // namespace layerskip
