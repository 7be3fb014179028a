"""Latency of layerskip::linear vs ATen (at::linear) on SmolLM2-135M shapes, with achieved memory bandwidth,
GFLOP/s and the roofline of each cell.

A decode step reads every weight once from memory, so the weights are timed cold: each call uses the next of
enough copies of the weight to exceed the caches (--ws-mb), and ours and ATen read different copies (else the
second finds the weight in cache). They are timed alternately, call by call, so that load from other processes
hits both alike. The first line measures the machine's read
bandwidth (torch.sum over a 1 GiB float32 buffer) as the roofline for the GB/s columns, and the second the
machine's float32 compute peak as ATen's GEMM reaches it (the best of repeated 512 x 512 x 512 products, in
cache). A cell's roofline time is max(weight bytes / bandwidth, 2 T N K / peak): at T = 1 every kernel is
memory bound; as T grows the multiply-adds per weight byte grow (T / 2 per bf16 byte, T / 4 per fp32 byte)
until compute bounds the call.

    python benchmarks/bench_linear.py            # full table (a few minutes)
    python benchmarks/bench_linear.py --quick    # CI smoke run: two shapes, small working set
    python benchmarks/bench_linear.py --cpu-time # 1 thread, timed by thread CPU time: robust on a busy machine
"""
import argparse
import statistics
import time

import torch

import layerskip_ext._C  # noqa: F401  (registers torch.ops.layerskip.*)
from layerskip_ext import ops as ls_ops
from memory_bandwidth import read_bandwidth

# (name, K = in features, N = out features) of SmolLM2-135M (hidden 576, kv 192, intermediate 1536); the engine
# runs q|k|v and gate|up fused
SHAPES = [
    ("q/o_proj 576->576", 576, 576),
    ("k/v_proj 576->192", 576, 192),
    ("q|k|v 576->960", 576, 960),
    ("gate|up 576->3072", 576, 3072),
    ("down 1536->576", 1536, 576),
    ("lm_head 576->49152", 576, 49152),
]
TOKENS = [1, 2, 4, 8, 16, 32, 64]


def time_pair(fns, copies, x, reps, clock, stat):
    """stat (median or 10th percentile) of the seconds per call of each fn(x, weight), cycling over the weight
    copies, fns interleaved."""
    times = [[] for _ in fns]
    for i in range(len(copies)):  # warm-up: one pass over the copies
        for fn in fns:
            fn(x, copies[i])
    for i in range(reps):
        for j, fn in enumerate(fns):
            w = copies[(i + j * len(copies) // len(fns)) % len(copies)]  # far from the copy the other fn just read
            t0 = clock()
            fn(x, w)
            times[j].append(clock() - t0)
    return [stat(t) for t in times]


def p10(times):
    return sorted(times)[len(times) // 10]


def gemm_peak(clock, reps: int = 20) -> float:
    """GFLOP/s of ATen's float32 GEMM on in-cache 512 x 512 operands (best of reps): the compute roofline."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        torch.mm(a, b)
        best = min(best, clock() - t0)
    return 2 * 512**3 / best / 1e9


def ours(x, w):
    out = torch.empty(x.shape[0], w.shape[0])  # [T, N] float32: the op writes into a buffer the caller owns
    torch.ops.layerskip.linear(out, x, w)
    return out


def aten_fp32(x, w):
    return torch.nn.functional.linear(x, w)


def aten_bf16(x, w):  # what a bf16 model does in eager PyTorch: bf16 activations, result widened
    return torch.nn.functional.linear(x.to(torch.bfloat16), w).float()


def aten_fp16(x, w):
    return torch.nn.functional.linear(x.to(torch.float16), w).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, T in {1, 8}, 64 MB working set")
    ap.add_argument("--ws-mb", type=int, default=512, help="bytes of weight copies cycled through (MB)")
    ap.add_argument("--reps", type=int, default=200, help="timed calls per cell")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, calls timed by this thread's CPU time (time slices lost to other processes "
                         "do not count); the bandwidth line is then that of one thread")
    ap.add_argument("--only", default="", help="run only the shapes whose name contains this")
    ap.add_argument("--tokens", default="", help="comma-separated T values (default 1,2,4,8,16,32,64)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes among fp32, bf16, fp16")
    ap.add_argument("--p10", action="store_true",
                    help="report the 10th percentile instead of the median (calls not preempted on a busy machine)")
    args = ap.parse_args()
    stat = p10 if args.p10 else statistics.median
    if args.cpu_time:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    shapes, tokens, ws_mb, reps = SHAPES, TOKENS, args.ws_mb, args.reps
    if args.quick:
        shapes, tokens, ws_mb, reps = [SHAPES[0], SHAPES[4]], [1, 8], 64, 20
    shapes = [s for s in shapes if args.only in s[0]]
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]

    bw_bytes = 1 << 26 if args.quick else 1 << 30
    bw = read_bandwidth(bw_bytes, reps=11, clock=clock, stat=stat)
    print(f"threads {torch.get_num_threads()}, {'thread CPU' if args.cpu_time else 'wall'} time, read bandwidth "
          f"(torch.sum, {bw_bytes >> 20} MiB) {bw:.1f} GB/s, weight working set {ws_mb} MB, {reps} calls per cell, "
          f"{'10th percentiles' if args.p10 else 'medians'}")
    peak = gemm_peak(clock)
    print(f"compute roofline (torch.mm 512^3 float32, best of 20): {peak:.1f} GFLOP/s; 'roof us' = "
          f"max(bytes / bandwidth, flops / peak), '%roof' = roof us / ours us")
    header = (f"{'shape':<20} {'dtype':<5} {'T':>3} | {'ours us':>8} {'GB/s':>6} {'%bw':>4} {'GFLOP/s':>7} "
              f"{'roof us':>8} {'%roof':>5} | {'aten us':>8} {'GB/s':>6} {'%bw':>4} | {'speedup':>7}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for name, k, n in shapes:
        base = torch.randn(n, k, generator=gen) / k**0.5  # [N, K]
        dtypes = {"fp32": (torch.float32, aten_fp32), "bf16": (torch.bfloat16, aten_bf16),
                  "fp16": (torch.float16, aten_fp16)}
        for dname in args.dtypes.split(","):
            dtype, aten = dtypes[dname]
            w = base.to(dtype)
            nbytes = w.numel() * w.element_size()
            copies = [w.clone() for _ in range(max(1, ws_mb * 2**20 // nbytes))]
            for t in tokens:
                x = torch.randn(t, k, generator=gen)  # [T, K]
                # the avx512bf16 kernel rounds the inputs of bf16 weights to bf16 (ops.linear_rounds_bf16_inputs)
                rounded = dtype == torch.bfloat16 and ls_ops.linear_rounds_bf16_inputs()
                x_ref = x.to(torch.bfloat16).float() if rounded else x
                torch.testing.assert_close(ours(x, w), aten_fp32(x_ref, w.float()), rtol=1e-3, atol=1e-3)
                t_ours, t_aten = time_pair([ours, aten], copies, x, reps, clock, stat)
                g_ours, g_aten = nbytes / t_ours / 1e9, nbytes / t_aten / 1e9
                flops = 2 * t * n * k
                roof = max(nbytes / (bw * 1e9), flops / (peak * 1e9))
                print(f"{name:<20} {dname:<5} {t:>3} | {t_ours * 1e6:>8.1f} {g_ours:>6.1f} {100 * g_ours / bw:>4.0f} "
                      f"{flops / t_ours / 1e9:>7.1f} {roof * 1e6:>8.1f} {100 * roof / t_ours:>5.0f} | "
                      f"{t_aten * 1e6:>8.1f} {g_aten:>6.1f} {100 * g_aten / bw:>4.0f} | {t_aten / t_ours:>6.2f}x",
                      flush=True)
            del copies


if __name__ == "__main__":
    main()
