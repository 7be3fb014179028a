"""Serving throughput and latency: concurrent streaming clients against `layerskip-ext serve`.

    python benchmarks/bench_serve.py --model checkpoints/layerskip-demo --clients 1,4,8,16 --requests 16 \\
        --strategies autoregressive,self_speculative --exit-layer 3 --num-speculations 2

For each strategy it starts the server in a subprocess (so the clients do not share its interpreter), sends
`--requests` requests (distinct prompts, `ignore_eos` so each generates exactly --max-tokens tokens) from each
number of concurrent clients, and prints requests/s, generated tokens/s, the speedup over 1 client (= the same
requests served one at a time), time to first token and per-token latency (p50 / p95, streamed SSE).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
from bench_common import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

PROMPTS = ["It was", "She said that", "The house at", "Mr. Darcy", "In the morning", "Once upon a time",
           "The letter", "Her sister"]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def one_request(client, url, body):
    """(time to first token, per-token latency, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return first - t0, (end - first) / max(tokens - 1, 1), tokens


async def run_level(url, model_name, clients, requests, max_tokens, settings):
    bodies = [{"model": model_name, "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": max_tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
               **settings} for i in range(requests)]
    queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results = []

    async def worker():
        async with httpx.AsyncClient(timeout=600) as client:
            while not queue.empty():
                results.append(await one_request(client, url, queue.get_nowait()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return dict(clients=clients, wall=wall, rps=len(results) / wall, tps=sum(r[2] for r in results) / wall,
                ttft=[r[0] for r in results], tpot=[r[1] for r in results])


def start_server(args, port):
    cmd = [sys.executable, "-m", "layerskip_ext.cli", "serve", "--port", str(port), "--model-name", "bench",
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--log-level", "warning", "--dtype", args.dtype,
           "--weights", args.weights]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--weights", default="auto", choices=["auto", "q8_0", "q4_0", "q4_1", "bf16", "fp32"],
                   help="the server's --weights (auto: a GGUF's own blocks, e.g. the default model's Q4_1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--strategies", default="autoregressive,self_speculative")
    p.add_argument("--exit-layer", type=int, default=None)
    p.add_argument("--num-speculations", type=int, default=None)
    p.add_argument("--adaptive", action="store_true", help="self-speculative rows use the adaptive drafting policy")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, url = start_server(args, port)
    try:
        print(f"model {args.model or 'SmolLM2-135M-Instruct'} (weights {args.weights}), {args.requests} requests x "
              f"{args.max_tokens} tokens per level, max batch {args.max_batch}, CPU: {cpu_name() or 'unknown'}")
        for strategy in args.strategies.split(","):
            settings = {"strategy": strategy}
            if strategy != "autoregressive":
                settings.update({k: v for k, v in (("exit_layer", args.exit_layer),
                                                   ("num_speculations", args.num_speculations)) if v is not None})
                if args.adaptive and strategy == "self_speculative":
                    settings["adaptive"] = True
            # warm up at the highest concurrency: the first use of each cache slot (its pages) and of the
            # workspace at that many rows is a one-time cost of a server, not part of its steady state
            asyncio.run(run_level(url, "bench", max(levels), max(levels), 4, settings))
            rows = [asyncio.run(run_level(url, "bench", c, args.requests, args.max_tokens, settings)) for c in levels]
            base = rows[0]["tps"]
            print(f"\n{strategy} {settings}")
            print(f"{'clients':>8}{'req/s':>8}{'tok/s':>9}{'vs 1':>7}{'TTFT p50':>10}{'p95':>8}"
                  f"{'ms/tok p50':>12}{'p95':>8}")
            for r in rows:
                print(f"{r['clients']:>8}{r['rps']:>8.2f}{r['tps']:>9.1f}{r['tps'] / base:>6.2f}x"
                      f"{percentile(r['ttft'], 0.5) * 1e3:>9.0f}m{percentile(r['ttft'], 0.95) * 1e3:>7.0f}m"
                      f"{percentile(r['tpot'], 0.5) * 1e3:>12.1f}{percentile(r['tpot'], 0.95) * 1e3:>8.1f}")
        metrics = httpx.get(url + "/metrics").text
        accept = [line for line in metrics.splitlines() if line.startswith("layerskip_acceptance_rate")]
        print("\nserver", accept[0] if accept else "")
    finally:
        proc.terminate()
        proc.wait(timeout=60)



if __name__ == "__main__":
    main()
