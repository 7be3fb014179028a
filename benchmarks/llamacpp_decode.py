"""llama.cpp's greedy decode tokens/s on one GGUF file, for bench_llamacpp.py, in a process of its own.

A separate interpreter, so that llama.cpp's threads share nothing with ours: importing layerskip_ext sets our
OpenMP wait policy (GOMP_SPINCOUNT) for the whole process, our engine's OpenMP workers live there, and llama.cpp's
ggml runs its own OpenMP regions in the same libgomp (bench_llamacpp.py passes the environment it had before that
import). On a 2-core machine with other processes running, llama.cpp's 2-thread decode can still collapse
(2-16 tokens/s instead of ~215 at Q4_0, in this process alone too): its threads wait for each other at every
op, so a descheduled one stalls all; compare figures from quiet runs only.
Prints one line per prompt: the decode tokens/s (prefill excluded: the first new token comes from it).

    python benchmarks/llamacpp_decode.py MODEL.gguf --threads 2 --tokens 128 --prompt "..." [--prompt ...]
"""
from __future__ import annotations

import argparse
import sys
import time


def decode_tokens_per_second(llm, prompt: str, tokens: int) -> float:
    ids = llm.tokenize(prompt.encode(), add_bos=False)
    n, t0 = 0, 0.0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        n += 1
        if n == 1:
            t0 = time.perf_counter()  # the prefill produced the first token
        if n == tokens:
            break
    return (n - 1) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--warmup", type=int, default=8, help="new tokens of a first, untimed run")
    p.add_argument("--llamacpp-path", default=None)
    args = p.parse_args()
    if args.llamacpp_path:
        sys.path.append(args.llamacpp_path)
    from llama_cpp import Llama
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                verbose=False)
    if args.warmup:
        decode_tokens_per_second(llm, args.prompt[0], args.warmup)
    for prompt in args.prompt:
        print(f"{decode_tokens_per_second(llm, prompt, args.tokens):.3f}", flush=True)


if __name__ == "__main__":
    main()
