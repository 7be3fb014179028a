"""Batched generation throughput: batch 1, 2, 4, 8, 16 on SmolLM2-135M (fp32 and bf16 weights, and the shipped
Q4_1 blocks: --models smollm2-q4_1) and on the LayerSkip demo checkpoint, autoregressive and self-speculative.

For each cell: total decode tokens/s of the batch (new tokens after the first, over the decode time the rows
share), tokens/s per row, acceptance (self-speculative), and total new tokens per CPU-second of the process
(all threads, prefill included): on a machine shared with other work, wall-clock rates mostly measure how much
CPU the run got, while tokens per CPU-second measure the work a token costs. Every row generates exactly --new-tokens tokens
(no stop ids). Medians of --repeats runs; the repeats interleave the batch sizes of one model and strategy
(1, 2, 4, 8, 16, 1, 2, ...), so that load from other processes hits every batch size alike. Prints markdown tables; asserts nothing about time.

    python benchmarks/bench_batch.py                    # the full table
    python benchmarks/bench_batch.py --quick            # small: CI
    python benchmarks/bench_batch.py --out benchmarks/results_batch.md
"""
from __future__ import annotations

import layerskip_ext  # before torch: it sets the OpenMP spin count before libgomp loads

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from layerskip_ext import ops  # noqa: E402
from bench_common import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "checkpoints", "layerskip-demo")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of thermodynamics are", "My favourite recipe for bread starts with",
           "In 1969 the first humans", "A haiku about the sea:", "The quick brown fox",
           "It is a truth universally acknowledged, that", "Photosynthesis converts", "Dear diary, today",
           "The stock market fell because", "To install the package, run", "Water boils at",
           "The best way to learn a language is", "Why is the sky blue?"]



def run_once(model, B: int, new_tokens: int, weight_dtype, **kw) -> tuple[float, float | None, float]:
    """(total decode tok/s, acceptance, new tokens per CPU-second) of one batched call."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
    cpu0 = time.process_time()
    results = layerskip_ext.generate(model, prompts, max_new_tokens=new_tokens, stop_token_ids=[],
                                     backend="engine", weight_dtype=weight_dtype, **kw)
    cpu_s = time.process_time() - cpu0
    decode_s = max(r.stats.decode_time_s for r in results)  # the rows share every step
    decoded = sum(max(r.stats.new_tokens - 1, 0) for r in results)
    drafted = sum(r.stats.drafted for r in results)
    acceptance = sum(r.stats.accepted for r in results) / drafted if drafted else None
    per_cpu_s = sum(r.stats.new_tokens for r in results) / cpu_s if cpu_s > 0 else 0.0
    return (decoded / decode_s if decode_s > 0 else 0.0), acceptance, per_cpu_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, 8 tokens, 1 repeat, demo model only")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--models", default="smollm2-fp32,smollm2-bf16,demo",
                   help="of smollm2-fp32, smollm2-bf16, smollm2-bf16-wide (float32-activation kernel), smollm2-q4_1, demo")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    models = a.models.split(",")
    if a.quick:
        batches, a.new_tokens, a.repeats, models = [1, 4], 8, 1, ["demo"]

    cpu = cpu_name() or platform.processor() or "unknown CPU"
    kernel = ops.linear_kernel()  # automatic, or LAYERSKIP_LINEAR_KERNEL's
    lines = [f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, linear kernel "
             f"{kernel} (bf16 weights: activations rounded to bf16: {ops.linear_rounds_bf16_inputs()}); "
             f"{a.new_tokens} new tokens per row, greedy, median of {a.repeats}.", ""]
    cache = {}
    for name in models:
        # smollm2-bf16-wide: bf16 weights on the float32-activation linear kernel (the default on CPUs with
        # AVX512_BF16 rounds the activations to bf16: avx512bf16), for a side-by-side comparison
        wide = name.endswith("-wide")
        ops.set_linear_kernel(next(k for k in ops.linear_kernels() if k != "avx512bf16") if wide else kernel)
        if name.startswith("smollm2"):
            if "smollm2" not in cache:
                cache["smollm2"] = layerskip_ext.load()
            model = cache["smollm2"]  # the shipped Q4_1 GGUF: "packed" computes on its blocks
            dtype = "packed" if "q4_1" in name else torch.bfloat16 if "bf16" in name else torch.float32
            spec = dict(strategy="self_speculative", exit_layer=8, num_speculations=4)
        else:
            model, dtype = layerskip_ext.load(DEMO), torch.float32
            spec = dict(strategy="self_speculative", exit_layer=3, num_speculations=2)
        for label, kw in (("autoregressive", dict()), (f"self-speculative E={spec['exit_layer']} "
                                                         f"d={spec['num_speculations']}", spec)):
            runs = {B: [] for B in batches}
            for _ in range(a.repeats):
                for B in batches:
                    runs[B].append(run_once(model, B, a.new_tokens, dtype, **kw))
            rows = []
            base = None
            for B in batches:
                total = statistics.median(r[0] for r in runs[B])
                per_row = total / B
                acc = statistics.median(r[1] for r in runs[B]) if runs[B][0][1] is not None else None
                cpu = statistics.median(r[2] for r in runs[B])
                base = (total, cpu) if base is None else base
                rows.append(f"| {B} | {total:.1f} | {per_row:.1f} | {total / base[0]:.2f}x | "
                            f"{'-' if acc is None else f'{100 * acc:.1f}%'} | {cpu:.1f} | {cpu / base[1]:.2f}x |")
                print(f"{name} {label} B={B}: {total:.1f} tok/s", file=sys.stderr, flush=True)
            lines += [f"### {name}, {label}", "", "| batch | total tok/s | tok/s per row | total vs batch 1 | "
                      "acceptance | tok per CPU-s | per CPU-s vs batch 1 |", "|---|---|---|---|---|---|---|"] + rows + [""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Batched generation throughput (benchmarks/bench_batch.py)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
