"""Latency of torch.ops.layerskip.attention on the calls the engine makes: batched decode (T rows, one token
each), a self-speculative verify block (T consecutive tokens of one row), at short and long contexts, with
float32 and bfloat16 caches. Median of --iters calls, in microseconds (each includes ~3 us of Python).

    python benchmarks/bench_attention.py [--shape smollm2|demo] [--threads N] [--kernel avx512|plain]

To compare two builds, run the same script with PYTHONPATH pointing at each tree's python/ in turn (an older
build has no --kernel choice; it is ignored there). Prints the CPU, the threads and the load average.
"""
import layerskip_ext  # noqa: F401  (before torch: sets the OpenMP spin count)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from layerskip_ext import ops  # noqa: E402
from bench_common import cpu_name  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "demo": (3, 1, 64)}  # query heads, kv heads, head_dim


def calls(shape: str):
    """(label, rows, positions) of each case."""
    batch = torch.arange(8)
    out = []
    for pos in ((60, 1000) if shape == "smollm2" else (30, 300)):
        out += [(f"decode  T=1 pos {pos}", torch.zeros(1, dtype=torch.long), torch.tensor([pos])),
                (f"decode  T=8 pos {pos}", batch, torch.full((8,), pos)),
                (f"verify  T=5 pos {pos}..{pos + 4}", torch.zeros(5, dtype=torch.long), pos + torch.arange(5)),
                (f"8 verify blocks of 3, pos {pos}", batch.repeat_interleave(3), pos + torch.arange(3).repeat(8))]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--kernel", default=None, help="force a kernel (ops.attention_kernels())")
    p.add_argument("--iters", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernel = "(one kernel)"
    if hasattr(ops, "set_attention_kernel"):
        ops.set_attention_kernel(args.kernel or "auto")
        kernel = ops.attention_kernel()
    hq, hkv, d = SHAPES[args.shape]
    capacity, batch = 2048, 8
    g = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_name()}, {args.threads} threads, kernel {kernel}, load {os.getloadavg()[0]:.2f}; "
          f"{args.shape}: Hq={hq} Hkv={hkv} D={d}; median of {args.iters} calls")
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(batch, hkv, capacity, d, generator=g).to(dtype)  # [B, Hkv, S, D]
        v = torch.randn(batch, hkv, capacity, d, generator=g).to(dtype)
        for label, rows, positions in calls(args.shape):
            q = torch.randn(len(rows), hq, d, generator=g)  # [T, Hq, D]
            out = torch.empty_like(q)
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                torch.ops.layerskip.attention(out, q, k, v, rows, positions, d**-0.5)
                times.append(time.perf_counter() - start)
            print(f"{str(dtype)[6:]:8s} cache  {label:32s} {statistics.median(times) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
