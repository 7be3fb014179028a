"""Measured memory read bandwidth: the denominator of every roofline figure in benchmarks/."""
import statistics
import time

import torch


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> float:
    """Median GB/s of torch.sum over a float32 buffer of nbytes (ATen's threads)."""
    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    del buf
    return nbytes / statistics.median(times) / 1e9
