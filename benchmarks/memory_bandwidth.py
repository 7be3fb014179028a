"""Measured memory read bandwidth: the denominator of every roofline figure in benchmarks/."""
import statistics
import time

import torch


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7, clock=time.perf_counter, stat=statistics.median) -> float:
    """GB/s of torch.sum over a float32 buffer of nbytes (ATen's threads): `stat` of `reps` timings by `clock`."""
    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(reps):
        t0 = clock()
        buf.sum()
        times.append(clock() - t0)
    del buf
    return nbytes / stat(times) / 1e9
