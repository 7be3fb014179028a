"""layerskip.linear on the GPU against cuBLAS (torch.mm in the weight's dtype), at decode-sized row counts:
microseconds per call (CUDA events over 200 calls) and weight bytes read per second. Shapes: a small model's
MLP and LM head, and Llama-3-8B-sized MLP matrices (several times the L2).

    python benchmarks/bench_cuda_linear.py            # needs a GPU; prints a table (benchmarks/results_cuda.md)
"""
import sys

import torch

from layerskip_ext import ops

SHAPES = [(6144, 1024), (32000, 1024), (28672, 4096), (4096, 14336)]  # [N, K] weights
ROWS = (1, 8, 64)


def time_us(fn, reps=200):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_linear: no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| N x K | weights | T | ours us | ours GB/s | cuBLAS us | cuBLAS GB/s |")
    print("|---|---|---|---|---|---|---|")
    for N, K in SHAPES:
        for wd in (torch.float32, torch.bfloat16):
            w = (torch.randn(N, K, device="cuda") * 0.02).to(wd)  # [N, K]
            gb = w.numel() * w.element_size() / 1e9
            for T in ROWS:
                x = torch.randn(T, K, device="cuda")  # [T, K] float32 activations, as the engine's
                ours = time_us(lambda: ops.linear(x, w))
                xw = x.to(wd)
                ref = time_us(lambda: torch.mm(xw, w.t()))
                print(f"| {N} x {K} | {str(wd)[6:]} | {T} | {ours:.1f} | {gb / ours * 1e6:.0f} | {ref:.1f} | "
                      f"{gb / ref * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
