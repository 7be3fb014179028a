"""Decode speed under a loaded machine: engine vs transformers with 0, 1 and 2 busy background processes.

    python benchmarks/bench_contention.py                    # SmolLM2-135M fp32, 64 tokens, 3 repeats
    python benchmarks/bench_contention.py --model checkpoints/layerskip-demo --tokens 64 --repeats 3

For each number of busy processes (each a Python loop spinning on one core), each OpenMP waiting policy
(ACTIVE: spinning workers; PASSIVE: what layerskip_ext chooses by default) and each engine thread mode ("auto":
the engine's default cap, one thread for a small model or while other processes fill every core; "all": every
torch thread, LAYERSKIP_THREADS=0), a fresh child process loads the
model once and measures, alternately, the engine's autoregressive greedy decode and transformers'
generate(do_sample=False) on the same weights: median decode tokens/s over --repeats runs of each (the
policy is read by libgomp when torch loads, hence one child per policy). The table puts them side by side,
with the engine/transformers ratio and each one's speed relative to its own unloaded speed. Nothing here
asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from bench_common import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

BUSY_LOOP = "while True: pass"


def measure(model_path, tokens: int, repeats: int, threads: int) -> dict:
    """In this process: median decode tokens/s of the engine and of transformers (same weights, greedy)."""
    import statistics
    import tempfile

    import torch

    import layerskip_ext
    from layerskip_ext.checkpoint import save_pretrained

    torch.set_num_threads(threads)
    model = layerskip_ext.load(model_path)
    prompt = model.encode("The capital of France is") if model.tokenizer else [1, 2, 3, 4, 5]
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model.module, None, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def engine_run() -> float:
        r = layerskip_ext.generate(model, prompt, max_new_tokens=tokens, stop_token_ids=[], backend="engine")
        return r.stats.tokens_per_second

    def hf_run() -> float:  # decode tokens/s: (tokens - 1) after the first, timed by a 1-token prefill run
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            t2 = time.perf_counter()
        return (tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9)

    engine_run(), hf_run()  # warm up
    e, h = [], []
    for _ in range(repeats):  # alternate, so both see the same background load
        e.append(engine_run())
        h.append(hf_run())
    return {"engine": statistics.median(e), "transformers": statistics.median(h)}


def run_child(args, policy: str, mode: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    env.pop("LAYERSKIP_THREADS", None)
    if mode == "all":
        env["LAYERSKIP_THREADS"] = "0"
    cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the measured process")
    p.add_argument("--busy", default="0,1,2", help="numbers of busy background processes")
    p.add_argument("--policies", default="ACTIVE,PASSIVE")
    p.add_argument("--modes", default="auto,all", help="engine thread modes: auto (default cap), all (uncapped)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.tokens, args.repeats, args.threads)))
        return 0

    import platform
    cpu = cpu_name() or platform.processor()
    print(f"CPU: {cpu}; {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}; "
          f"{args.threads} threads, {args.tokens} tokens, median of {args.repeats}")
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
        try:
            for policy in args.policies.split(","):
                for mode in args.modes.split(","):
                    rows.append((busy, f"{policy}/{mode}", run_child(args, policy, mode)))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    base = {policy: r for busy, policy, r in rows if busy == 0}
    print(f"{'busy':>4} {'policy/threads':>15} {'engine tok/s':>13} {'transformers':>13} {'engine/hf':>10} "
          f"{'engine vs idle':>15} {'hf vs idle':>11}")
    for busy, policy, r in rows:
        b = base.get(policy, r)
        print(f"{busy:>4} {policy:>15} {r['engine']:>13.1f} {r['transformers']:>13.1f} "
              f"{r['engine'] / r['transformers']:>9.2f}x {r['engine'] / b['engine']:>14.2f}x "
              f"{r['transformers'] / b['transformers']:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
