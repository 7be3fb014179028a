"""Self-speculative settings side by side: autoregressive vs fixed (E, d) vs the adaptive drafting policy.

Greedy, C++ engine. Prompts are cut from a text file (held-out text); for each prompt every setting runs once in
turn (interleaved, so the machine's load drifts evenly over the settings). Per setting: median over prompts of
tokens/s, median over prompts of the speed-up over autoregressive on the same prompt, and the acceptance rate
(accepted / drafted over all prompts). Output is checked: greedy tokens equal autoregressive ones.

    python benchmarks/bench_adaptive.py --model checkpoints/layerskip-demo --text valid.txt \\
        --setting 3,2 --setting 3,4,0.3,adaptive --setting 3,4,0.3,adaptive,256
A setting is E,d[,threshold[,adaptive|fixed[,K]]] (K: reduced draft head of the K most frequent tokens).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import layerskip_ext
from layerskip_ext.tune import prompts_from_text
from bench_common import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)


def parse_setting(text: str) -> dict:
    parts = text.split(",")
    if not 2 <= len(parts) <= 5:
        raise SystemExit(f"--setting {text!r}: expected E,d[,threshold[,adaptive|fixed[,K]]]")
    out = dict(strategy="self_speculative", exit_layer=int(parts[0]), num_speculations=int(parts[1]),
               draft_threshold=float(parts[2]) if len(parts) > 2 else 0.0,
               adaptive=len(parts) > 3 and parts[3] == "adaptive",
               draft_vocab_size=int(parts[4]) if len(parts) > 4 and int(parts[4]) > 0 else None)
    return out


def label(s: dict) -> str:
    if s["strategy"] == "autoregressive":
        return "autoregressive"
    k = s["draft_vocab_size"]
    return (f"E={s['exit_layer']} d={s['num_speculations']} thr={s['draft_threshold']:g} "
            f"{'adaptive' if s['adaptive'] else 'fixed'}{'' if k is None else f' K={k}'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", required=True, help="text file the prompts are cut from")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--setting", action="append", default=[], help="E,d[,threshold[,adaptive|fixed[,K]]]")
    p.add_argument("--draft-vocab-text", default=None,
                   help="count the draft vocabulary on this text first (in memory; not stored)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = layerskip_ext.load(args.model, dtype=getattr(torch, args.dtype))
    if args.draft_vocab_text:
        from layerskip_ext.draft_vocab import count_tokens
        with open(args.draft_vocab_text, encoding="utf-8") as f:
            model.draft_vocab = count_tokens(model.encode(f.read()))
    with open(args.text, encoding="utf-8") as f:
        prompts = prompts_from_text(model, f.read(), count=args.prompts, length=args.prompt_len)
    settings = [dict(strategy="autoregressive", exit_layer=None, num_speculations=None, draft_threshold=0.0,
                     adaptive=False, draft_vocab_size=None)] + [parse_setting(s) for s in args.setting]
    common = dict(max_new_tokens=args.max_new_tokens, stop_token_ids=[], backend="engine")
    layerskip_ext.generate(model, prompts[0], **dict(common, max_new_tokens=8))  # warm up
    tps = [[] for _ in settings]  # [setting][prompt]
    drafted = [0] * len(settings)
    accepted = [0] * len(settings)
    t0 = time.perf_counter()
    for prompt in prompts:
        reference = None
        for i, s in enumerate(settings):
            r = layerskip_ext.generate(model, prompt, **common, **s)
            if reference is None:
                reference = r.tokens
            elif r.tokens != reference:
                print(f"MISMATCH: {label(s)} differs from autoregressive", file=sys.stderr)
                return 1
            tps[i].append(r.stats.tokens_per_second)
            drafted[i] += r.stats.drafted
            accepted[i] += r.stats.accepted
    cpu = cpu_name() or "unknown CPU"
    print(f"model {args.model or 'SmolLM2-135M-Instruct'} ({args.dtype}), {len(prompts)} prompts of "
          f"{args.prompt_len} tokens from {args.text}, {args.max_new_tokens} new tokens, greedy, "
          f"{args.threads} threads, {cpu}; {time.perf_counter() - t0:.0f} s")
    print("| setting | tokens/s (median) | speed-up (median of per-prompt ratios) | acceptance |")
    print("|---|---:|---:|---:|")
    for i, s in enumerate(settings):
        ratio = statistics.median(a / b for a, b in zip(tps[i], tps[0]))
        acc = f"{accepted[i] / drafted[i]:.1%}" if drafted[i] else "-"
        print(f"| {label(s)} | {statistics.median(tps[i]):.1f} | {ratio:.2f}x | {acc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
