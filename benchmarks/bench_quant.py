"""Throughput of layerskip::linear_quantized (packed Q8_0 / Q4_0 / Q4_1 blocks) against the memory roofline.

A decode step streams every weight from memory once, so the weights are timed cold: each call uses the next
of enough copies of the matrix to exceed the caches (--ws-mb). GB/s counts the packed bytes read; the
roofline is the machine's read bandwidth (torch.sum over 1 GiB, benchmarks/memory_bandwidth.py), measured
in the same run. bf16 `layerskip::linear` is timed alongside as the float baseline. Rows T = 1 (a decode
step) to 64 (a batch): the kernel reads each block once for all T rows, so GB/s should hold until compute
(T int8 dot products per block) takes over.

    python benchmarks/bench_quant.py                 # default: SmolLM2 shapes, T = 1..64, every kernel
    python benchmarks/bench_quant.py --quick         # smoke run
    python benchmarks/bench_quant.py --kernel avx2   # force one kernel
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_bandwidth import read_bandwidth  # noqa: E402

from layerskip_ext import ops  # noqa: E402
from layerskip_ext.quant import quantize  # noqa: E402
from bench_common import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

# one decoder layer of SmolLM2-135M, fused as the engine runs it (q|k|v 960 x 576, o 576 x 576,
# gate|up 3072 x 576, down 576 x 1536), and the LM head
LAYER = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
HEAD = [("lm_head", 49152, 576)]


def make_copies(fmt, shapes, ws_bytes, gen):
    """Enough copies of the matrices `shapes` to exceed ws_bytes: [(N, K, data, bytes)]."""
    base = []
    for _, n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.05
        base.append((n, k, quantize(w, fmt).data if fmt != "bf16" else w.to(torch.bfloat16)))
    per_set = sum(d.numel() * d.element_size() for _, _, d in base)
    copies = []
    for _ in range(max(1, -(-ws_bytes // per_set))):
        copies += [(n, k, d.clone(), d.numel() * d.element_size()) for n, k, d in base]
    return copies


def bench(fmt, shapes, tokens, ws_bytes, reps, gen):
    """Median seconds of one pass over `shapes` (all matrices, T rows), and the bytes of one pass."""
    copies = make_copies(fmt, shapes, ws_bytes, gen)
    fmt_id = {"q8_0": 8, "q4_0": 2, "q4_1": 3}.get(fmt)
    per_pass = len(shapes)
    xs = {k: torch.randn(tokens, k, generator=gen) for _, _, k in shapes}

    def one(i):
        n, k, d, _ = copies[i]
        if fmt == "bf16":
            ops.linear(xs[k], d)
        else:
            ops.linear_quantized(xs[k], d, fmt_id, n, k)

    for i in range(len(copies)):  # warm-up pass over every copy
        one(i)
    times, pass_bytes = [], sum(c[3] for c in copies[:per_pass])
    i = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_pass):
            one(i)
            i = (i + 1) % len(copies)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), pass_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kernel", default="auto", help="force a kernel (see ops.quant_kernels())")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ws-mb", type=int, default=256, help="working set of weight copies, MB")
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops.set_quant_kernel(args.kernel)
    tokens = [1, 8] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    formats = ["q8_0", "q4_0", "q4_1", "bf16"]
    ws = (16 if args.quick else args.ws_mb) << 20
    reps = 5 if args.quick else args.reps
    gen = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_name() or 'unknown'}; {args.threads} threads; kernel {ops.quant_kernel()} (supported: "
          f"{', '.join(ops.quant_kernels())})")
    roof = read_bandwidth(reps=3 if args.quick else 7)
    print(f"memory read bandwidth (roofline): {roof:.1f} GB/s\n")
    print("| shapes | format | T | us per pass | GB/s | roofline |")
    print("|---|---|---:|---:|---:|---:|")
    for label, shapes in (("SmolLM2 layer", LAYER), ("LM head", HEAD)):
        for fmt in formats:
            for t in tokens:
                sec, nbytes = bench(fmt, shapes, t, ws, reps, gen)
                gbs = nbytes / sec / 1e9
                print(f"| {label} | {fmt} | {t} | {sec * 1e6:.0f} | {gbs:.1f} | {gbs / roof:.0%} |", flush=True)



if __name__ == "__main__":
    main()
