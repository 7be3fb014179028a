"""Soak: many threads generating on one model at once, mixed strategies and sampling, against sequential runs.

    python benchmarks/soak.py                                # 8 threads x 200 generations, the demo checkpoint
    python benchmarks/soak.py --threads 2 --per-thread 10    # the quick version (tests/test_soak.py)

Every job (prompt, strategy, exit layer, draft length, temperature, top-k/top-p, seed) is first run
sequentially; then `--threads` threads run all jobs again concurrently on the same model, each thread its
share. One job in `--cancel-every` is first started with an on_token callback that raises after a few tokens
(a cancelled generation): the exception must reach the caller, and the job run right after it must still give
the sequential tokens. Reports: how many concurrent results differ from the sequential ones (tokens), how many
calls raised, how many cancellations misbehaved, and resident memory (RSS) before, after the sequential pass and
over the concurrent pass (at a quarter of its jobs and at the end: the growth between the two must stay under
`--max-growth-mb`). Exit status 1 when any result differs, any call raised, a cancellation misbehaved or the
memory grew.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

import layerskip_ext

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "checkpoints", "layerskip-demo")
PROMPTS = ["It is a truth universally acknowledged, that", "Once upon a time", "The weather today",
           "She opened the door and", "In the beginning"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_jobs(n: int, num_layers: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        strategy = rng.choice(["autoregressive", "early_exit", "self_speculative"])
        job = dict(prompt=rng.choice(PROMPTS), strategy=strategy, max_new_tokens=rng.randint(1, 32),
                   stop_token_ids=[])
        if strategy != "autoregressive":
            job["exit_layer"] = rng.randint(1, num_layers - 1)
        if strategy == "self_speculative":
            job["num_speculations"] = rng.randint(1, 5)
        if rng.random() < 0.5:
            job.update(temperature=rng.choice([0.6, 1.0]), top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]),
                       seed=rng.getrandbits(63))
        jobs.append(job)
    return jobs


def run(model, job, backend):
    job = dict(job)
    return layerskip_ext.generate(model, job.pop("prompt"), backend=backend, **job).tokens


class Cancelled(Exception):
    """Raised by the cancelling on_token callback."""


def run_cancelled(model, job, backend, after: int) -> str | None:
    """Starts `job` with an on_token that raises Cancelled at its `after`-th token; None when the exception
    reached the caller (or the job ended before that token), else what went wrong."""
    job = dict(job)
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == after:
            raise Cancelled

    try:
        layerskip_ext.generate(model, job.pop("prompt"), backend=backend, on_token=on_token, **job)
    except Cancelled:
        return None
    except Exception as e:  # noqa: BLE001  (reported)
        return f"{type(e).__name__}: {e}"
    return None if len(seen) < after else "the generation went on after on_token raised"


def soak(model, threads: int, per_thread: int, backend: str = "engine", seed: int = 0,
         cancel_every: int = 10) -> dict:
    """Runs the soak; returns counts and RSS figures (see the module docstring)."""
    jobs = make_jobs(threads * per_thread, model.num_layers, seed)
    rng = random.Random(seed + 1)
    cancel_at = {i: rng.randint(1, 4) for i in range(len(jobs)) if cancel_every and i % cancel_every == 0}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    expected = [run(model, job, backend) for job in jobs]
    sequential_s = time.perf_counter() - t0
    rss1 = rss_mb()
    got: list = [None] * len(jobs)
    errors: list[str] = []
    cancel_failures: list[str] = []
    done = [0]
    rss_quarter = [float("nan")]
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(k, len(jobs), threads):
            if i in cancel_at:
                problem = run_cancelled(model, jobs[i], backend, cancel_at[i])
                if problem is not None:
                    cancel_failures.append(f"job {i}: {problem}")
            try:
                got[i] = run(model, jobs[i], backend)
            except Exception as e:  # noqa: BLE001  (counted and reported)
                errors.append(f"job {i}: {type(e).__name__}: {e}")
            with lock:
                done[0] += 1
                if done[0] == max(1, len(jobs) // 4):
                    rss_quarter[0] = rss_mb()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    concurrent_s = time.perf_counter() - t0
    rss2 = rss_mb()
    mismatches = sum(1 for a, b in zip(expected, got) if b is not None and a != b)
    return dict(jobs=len(jobs), mismatches=mismatches, errors=errors, cancelled=len(cancel_at),
                cancel_failures=cancel_failures, sequential_s=sequential_s, concurrent_s=concurrent_s,
                rss_start_mb=rss0, rss_after_sequential_mb=rss1, rss_quarter_mb=rss_quarter[0],
                rss_after_concurrent_mb=rss2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--per-thread", type=int, default=200)
    p.add_argument("--backend", default="engine", choices=["engine", "reference"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cancel-every", type=int, default=10, help="cancel one job in N from on_token (0: none)")
    p.add_argument("--max-growth-mb", type=float, default=64.0,
                   help="RSS growth allowed from a quarter of the concurrent pass to its end")
    args = p.parse_args()
    model = layerskip_ext.load(args.model)
    r = soak(model, args.threads, args.per_thread, args.backend, args.seed, args.cancel_every)
    growth = r["rss_after_concurrent_mb"] - r["rss_quarter_mb"]
    print(f"{r['jobs']} generations ({args.threads} threads x {args.per_thread}), backend {args.backend}, "
          f"model {os.path.normpath(args.model)}")
    print(f"sequential {r['sequential_s']:.1f} s, concurrent {r['concurrent_s']:.1f} s")
    print(f"results differing from sequential: {r['mismatches']}; calls that raised: {len(r['errors'])}")
    print(f"generations cancelled from on_token: {r['cancelled']}; cancellations that misbehaved: "
          f"{len(r['cancel_failures'])}")
    for e in (r["errors"] + r["cancel_failures"])[:5]:
        print("  " + e)
    print(f"RSS: start {r['rss_start_mb']:.0f} MB, after sequential {r['rss_after_sequential_mb']:.0f} MB, "
          f"a quarter into the concurrent pass {r['rss_quarter_mb']:.0f} MB, "
          f"after concurrent {r['rss_after_concurrent_mb']:.0f} MB "
          f"(growth over the concurrent pass {r['rss_after_concurrent_mb'] - r['rss_after_sequential_mb']:+.0f} MB, "
          f"over its last three quarters {growth:+.0f} MB)")
    flat = growth <= args.max_growth_mb
    if not flat:
        print(f"memory grew by {growth:.0f} MB over the last three quarters (allowed {args.max_growth_mb:.0f} MB)")
    ok = r["mismatches"] == 0 and not r["errors"] and not r["cancel_failures"] and flat
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
