"""Measured memory read bandwidth: the denominator of every roofline figure in benchmarks/.

The buffer is read from 2 MiB pages where the system grants them (a private anonymous mapping advised
MADV_HUGEPAGE), as the engine's weights are (csrc/engine/huge_pages.h): on 4 KiB pages torch.sum reads ~15%
less (Zen 4, 2 threads: 29.5-30.2 vs 34.4-35.5 GB/s, alternating in one process), which would understate the
machine and overstate a roofline fraction.
"""
import mmap
import statistics
import time

import torch

HUGE_PAGE = 2 << 20


def huge_page_ones(numel: int) -> torch.Tensor:
    """float32 ones [numel] in memory advised for huge pages (plain torch.ones where mmap or madvise is missing)."""
    try:
        # MAP_PRIVATE: a shared anonymous mapping is shmem, which follows another THP setting
        buf = mmap.mmap(-1, numel * 4 + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        return torch.ones(numel)
    whole = torch.frombuffer(buf, dtype=torch.float32)  # keeps `buf` alive
    skip = (-whole.data_ptr() % HUGE_PAGE) // 4  # start on a 2 MiB boundary
    return whole[skip:skip + numel].fill_(1.0)


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7, clock=time.perf_counter, stat=statistics.median) -> float:
    """GB/s of torch.sum over a float32 buffer of nbytes (ATen's threads): `stat` of `reps` timings by `clock`."""
    buf = huge_page_ones(nbytes // 4)
    times = []
    for _ in range(reps):
        t0 = clock()
        buf.sum()
        times.append(clock() - t0)
    del buf
    return nbytes / stat(times) / 1e9
