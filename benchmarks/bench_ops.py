"""Latency of each layerskip op on SmolLM2-135M shapes, next to the plain-PyTorch equivalent.

H=576, 9 query / 3 kv heads, D=64, I=1536, V=49152, 512 tokens of context; T=1 (a decode step) and
T=8 (a verify block). Prints the median over the runs of each op, in microseconds.

    python benchmarks/bench_ops.py [--quick] [--threads N]
"""
import argparse
import statistics
import time

import torch

from layerskip_ext import ops

H, HQ, HKV, D, I, V, CONTEXT = 576, 9, 3, 64, 1536, 49152, 512


def median_us(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"layerskip::{name}", "CPU")


def cases(T: int):
    """(name, op call, PyTorch equivalent call or None) for T tokens."""
    g = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g), torch.randn(H, generator=g)
    q, k, v = torch.randn(T, HQ, D, generator=g), torch.randn(T, HKV, D, generator=g), torch.randn(T, HKV, D, generator=g)
    cache = ops.rotary_cos_sin_cache(ops.rope_inv_freq(D, 100000.0), 2048)
    positions = torch.arange(CONTEXT - T, CONTEXT)
    k_cache, v_cache = torch.randn(1, HKV, 2048, D, generator=g), torch.randn(1, HKV, 2048, D, generator=g)
    rows = torch.zeros(T, dtype=torch.int64)  # every token in cache row 0
    gate_up = torch.randn(T, 2 * I, generator=g)
    logits = torch.randn(T, V, generator=g) * 3
    probs = torch.softmax(logits, -1)
    draft, draft_probs = logits[: T - 1].argmax(-1), torch.softmax(logits[: T - 1] * 0.9, -1)
    start = CONTEXT - T
    scale = D**-0.5
    w_in, w_down = torch.randn(2 * I, H, generator=g), torch.randn(H, I, generator=g)

    def torch_attention():
        kk = k_cache[0, :, :CONTEXT].repeat_interleave(HQ // HKV, 0)
        vv = v_cache[0, :, :CONTEXT].repeat_interleave(HQ // HKV, 0)
        mask = torch.arange(CONTEXT)[None, :] <= positions[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)

    yield "rms_norm", lambda: ops.rms_norm(x, w, 1e-5), lambda: ops.rms_norm_reference(x, w, 1e-5)
    yield ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, res, w, 1e-5),
           lambda: ops.rms_norm_reference(res.add_(x), w, 1e-5))
    yield ("rotary_embedding", lambda: ops.rotary_embedding(q, k, positions, cache),
           lambda: ops.rotary_embedding_reference(q, k, positions, cache))
    yield ("kv_cache_write", lambda: ops.kv_cache_write(k_cache, v_cache, k, v, rows, positions),
           lambda: (k_cache[0, :, start:CONTEXT].copy_(k.transpose(0, 1)),
                    v_cache[0, :, start:CONTEXT].copy_(v.transpose(0, 1))))
    yield "attention", lambda: ops.attention(q, k_cache, v_cache, rows, positions, scale), torch_attention
    yield "silu_and_mul", lambda: ops.silu_and_mul(gate_up), lambda: ops.silu_and_mul_reference(gate_up)
    if has_cpu_kernel("linear"):
        yield "linear gate_up [3072x576]", lambda: ops.linear(x, w_in), lambda: torch.nn.functional.linear(x, w_in)
        yield ("linear down [576x1536]", lambda: ops.linear(gate_up[:, :I], w_down),
               lambda: torch.nn.functional.linear(gate_up[:, :I], w_down))
    yield ("sampling_probs t=.8 p=.9", lambda: ops.sampling_probs(logits, 0.8, 0, 0.9),
           lambda: ops.sampling_probs_reference(logits, 0.8, 0, 0.9))
    yield ("sampling_probs t=.8 k=50", lambda: ops.sampling_probs(logits, 0.8, 50, 1.0),
           lambda: ops.sampling_probs_reference(logits, 0.8, 50, 1.0))
    yield "sample_from_probs", lambda: ops.sample_from_probs(probs, 1, 0), lambda: torch.multinomial(probs, 1)
    yield "sample greedy", lambda: ops.sample(logits, 0.0, 0, 1.0, 1, 0), lambda: logits.argmax(-1)
    yield ("sample t=.8 p=.9", lambda: ops.sample(logits, 0.8, 0, 0.9, 1, 0),
           lambda: torch.multinomial(ops.sampling_probs_reference(logits, 0.8, 0, 0.9), 1))
    yield ("speculative_accept_greedy", lambda: ops.speculative_accept_greedy(draft, logits),
           lambda: ops.speculative_accept_greedy_reference(draft, logits))
    yield ("speculative_accept", lambda: ops.speculative_accept(draft, draft_probs, probs, 1, 0),
           lambda: ops.speculative_accept_reference(draft, draft_probs, probs, 1, 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few iterations (CI smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    iters, warmup = (3, 1) if args.quick else (200, 20)
    print(f"threads={torch.get_num_threads()} iters={iters}; median microseconds (ours / PyTorch eager)")
    rows = {}
    for T in (1, 8):
        for name, fn, baseline in cases(T):
            ours = median_us(fn, iters, warmup)
            base = median_us(baseline, max(iters // 10, 3), 1) if baseline else float("nan")
            rows.setdefault(name, {})[T] = (ours, base)
    print(f"{'op':28s} {'T=1 ours':>10s} {'T=1 torch':>10s} {'T=8 ours':>10s} {'T=8 torch':>10s}")
    for name, by_t in rows.items():
        cells = "".join(f" {by_t[T][0]:10.1f} {by_t[T][1]:10.1f}" for T in (1, 8))
        print(f"{name:28s}{cells}")


if __name__ == "__main__":
    main()
