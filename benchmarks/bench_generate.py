"""Per-token latency of every decoding strategy of the C++ engine, side by side with transformers.

    python benchmarks/bench_generate.py --quick   # CI: a tiny random model, each op and each strategy (seconds)
    python benchmarks/bench_generate.py           # SmolLM2-135M: engine vs transformers vs the roofline

Full mode, in one run (2 threads, batch 1, 128 new tokens, median over several prompts):
  1. memory read bandwidth of the machine (torch.sum over 1 GiB) and the weight bytes one token reads:
     the roofline tokens/s;
  2. engine autoregressive (fp32, and bf16 weights) vs transformers generate(do_sample=False) on the same
     weights (saved with save_pretrained and loaded by transformers);
  3. engine self-speculative for a grid of (E, d) with acceptance rates, vs transformers
     generate(assistant_early_exit=E, num_assistant_tokens=d);
  4. a per-token time breakdown of engine decoding from the engine's built-in timers.
Decode tokens/s exclude the prefill (the first token comes from it). Nothing here asserts a time.
The OpenMP wait policy is layerskip_ext's (idle workers spin about 0.1 ms, then sleep) unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set.
"""
from __future__ import annotations

import os

import layerskip_ext  # noqa: E402  (before torch: it sets the OpenMP wait policy before libgomp loads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from layerskip_ext import engine as engine_mod  # noqa: E402
from layerskip_ext.checkpoint import save_pretrained  # noqa: E402

from memory_bandwidth import read_bandwidth  # noqa: E402
from bench_common import table  # noqa: E402  (benchmarks/ is the script's directory)

PROMPTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple terms.",
    "List three uses of a paperclip:",
    "def fibonacci(n):",
]




def copy_bandwidth(nbytes: int = 1 << 29, reps: int = 7) -> float:
    """Median GB/s (bytes read + written) of a float32 copy of nbytes."""
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9



# ----------------------------------------------------------------------------------------------
# engine runs


def engine_run(model, prompts, new_tokens, weight_dtype=torch.float32, **kw):
    """Median decode ms/token over the prompts, and the acceptance rate summed over them."""
    ms, drafted, accepted = [], 0, 0
    layerskip_ext.generate(model, prompts[0], max_new_tokens=4, stop_token_ids=[], backend="engine",
                           weight_dtype=weight_dtype, **kw)  # warm-up (builds the engine)
    for p in prompts:
        r = layerskip_ext.generate(model, p, max_new_tokens=new_tokens, stop_token_ids=[], backend="engine",
                                   weight_dtype=weight_dtype, **kw)
        ms.append(r.stats.time_per_token * 1e3)
        drafted += r.stats.drafted
        accepted += r.stats.accepted
    return statistics.median(ms), (accepted / drafted if drafted else None)


def breakdown(model, prompt, new_tokens, weight_dtype=torch.float32, **kw):
    """Per-token ms of each engine category over the decode phase; 'loop overhead' is the rest."""
    from layerskip_ext.generation import check_generation_args

    eng = engine_mod.get_engine(model, weight_dtype)
    args = check_generation_args(model.config, model.tokenizer, prompt, max_new_tokens=new_tokens,
                                 strategy=kw.get("strategy", "autoregressive"), exit_layer=kw.get("exit_layer"),
                                 num_speculations=kw.get("num_speculations"), temperature=0.0, top_k=0, top_p=1.0,
                                 seed=0, stop_token_ids=[], context_length=model.config.max_position_embeddings)
    r = eng.generate(args, profile=True)
    n = max(r.stats.new_tokens - 1, 1)
    per = {k: v * 1e3 / n for k, v in eng.last_profile.items()}
    total = r.stats.decode_time_s * 1e3 / n
    layers = sum(per[k] for k in ("embed", "attention", "mlp"))
    rest = total - sum(per.values())
    rows = [[k, per[k], 100 * per[k] / total] for k in per]
    rows += [["= layers (embed, attention, mlp)", layers, 100 * layers / total],
             ["loop overhead (rest)", rest, 100 * rest / total], ["total decode", total, 100.0]]
    return rows


# ----------------------------------------------------------------------------------------------
# transformers runs


def hf_model(model, directory):
    from transformers import LlamaForCausalLM

    save_pretrained(model.module, model.tokenizer, directory)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_run(hf, model, prompts, new_tokens, **kw):
    """Median decode ms/token of transformers generate: (time of n tokens - time of 1 token) / (n - 1)."""
    ms = []
    for p in prompts:
        ids = torch.tensor([model.encode(p)])
        times = {}
        for n in (1, new_tokens):
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kw)
            times[n] = time.perf_counter() - t0
            assert out.shape[1] - ids.shape[1] == n
        ms.append((times[new_tokens] - times[1]) * 1e3 / (new_tokens - 1))
    return statistics.median(ms)


# ----------------------------------------------------------------------------------------------
# quick mode


def time_op(fn, reps=50):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def quick(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=6, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        model = layerskip_ext.load(d)
    c = model.config
    from layerskip_ext import ops  # the wrappers: they allocate the outputs the ops write
    H, D, Hq, Hkv, I, V, S = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size, \
        c.vocab_size, 256
    x, w_h, w_qkv = torch.randn(1, H), torch.ones(H), torch.randn((Hq + 2 * Hkv) * D, H)
    w_qkv16 = w_qkv.bfloat16()
    q, k = torch.randn(1, Hq, D), torch.randn(1, Hkv, D)
    kc, vc = torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)
    pos, row0, table_ = torch.tensor([100]), torch.tensor([0]), model.module.rope_cache()
    logits = torch.randn(1, V)
    rows = [
        ["rms_norm [1, H]", time_op(lambda: ops.rms_norm(x, w_h, 1e-5))],
        ["fused_add_rms_norm [1, H]", time_op(lambda: ops.fused_add_rms_norm(x, x.clone(), w_h, 1e-5))],
        ["linear qkv [1, H] fp32", time_op(lambda: ops.linear(x, w_qkv))],
        ["linear qkv [1, H] bf16", time_op(lambda: ops.linear(x, w_qkv16))],
        ["linear lm_head [1, H] fp32", time_op(lambda: ops.linear(x, model.module.lm_head.weight.detach()))],
        ["rotary_embedding [1 token]", time_op(lambda: ops.rotary_embedding(q, k, pos, table_))],
        ["kv_cache_write [1 token]", time_op(lambda: ops.kv_cache_write(kc, vc, k, k, row0, pos))],
        ["attention [1 q, 200 ctx]", time_op(lambda: ops.attention(q, kc, vc, row0, torch.tensor([199]), D ** -0.5))],
        ["silu_and_mul [1, 2I]", time_op(lambda: ops.silu_and_mul(torch.randn(1, 2 * I)))],
        ["sample greedy [1, V]", time_op(lambda: ops.sample(logits, 0.0, 0, 1.0, 0, 0))],
        ["sample t=0.8 top_p=0.9 [1, V]", time_op(lambda: ops.sample(logits, 0.8, 0, 0.9, 0, 0))],
    ]
    table(f"ops (us per call; H={H}, V={V})", ["op", "us"], rows)
    prompt = list(range(1, 17))
    runs = [("autoregressive", {}), ("early_exit E=3", dict(strategy="early_exit", exit_layer=3)),
            ("self_speculative E=3 d=4", dict(strategy="self_speculative", exit_layer=3, num_speculations=4)),
            ("self_speculative E=3 d=4 t=0.8",
             dict(strategy="self_speculative", exit_layer=3, num_speculations=4, temperature=0.8, seed=1))]
    rows = []
    for name, kw in runs:
        ms, acc = engine_run(model, [prompt], 32, **kw)
        ref = layerskip_ext.generate(model, prompt, max_new_tokens=32, stop_token_ids=[], backend="reference", **kw)
        rows.append([name, ms, 1e3 / ms, ref.stats.time_per_token * 1e3, "-" if acc is None else f"{acc:.2f}"])
    table("strategies (tiny random model, 6 layers, 32 new tokens)",
          ["strategy", "engine ms/tok", "engine tok/s", "reference ms/tok", "acceptance"], rows)


# ----------------------------------------------------------------------------------------------
# full mode


def full(args):
    model = layerskip_ext.load()
    prompts = PROMPTS[: args.prompts]
    n = args.new_tokens
    bw_read, bw_copy = read_bandwidth(), copy_bandwidth()
    eng32 = engine_mod.get_engine(model, torch.float32)
    bytes32 = eng32.weight_bytes_per_token
    roof32 = bw_read * 1e9 / bytes32
    table("machine", ["quantity", "value"],
          [["threads", torch.get_num_threads()], ["OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY")],
           ["GOMP_SPINCOUNT", os.environ.get("GOMP_SPINCOUNT")],
           ["load average (1 min) at start", os.getloadavg()[0]], ["read bandwidth GB/s (sum, 1 GiB)", bw_read],
           ["copy bandwidth GB/s (read+write)", bw_copy], ["fp32 weight MB per token", bytes32 / 1e6],
           ["fp32 roofline tok/s", roof32]])

    rows = []
    ar32, _ = engine_run(model, prompts, n)
    rows.append(["engine autoregressive fp32", ar32, 1e3 / ar32, 1e3 / ar32 / roof32])
    ar16 = None
    if not args.no_bf16:
        bytes16 = engine_mod.get_engine(model, torch.bfloat16).weight_bytes_per_token
        roof16 = bw_read * 1e9 / bytes16
        ar16, _ = engine_run(model, prompts, n, weight_dtype=torch.bfloat16)
        rows.append(["engine autoregressive bf16 weights", ar16, 1e3 / ar16, 1e3 / ar16 / roof16])
    hf = None
    if not args.no_transformers:
        tmp = tempfile.mkdtemp(prefix="bench_hf_")
        hf = hf_model(model, tmp)
        hf_ms = hf_run(hf, model, prompts, n)
        rows.append(["transformers generate fp32 (greedy)", hf_ms, 1e3 / hf_ms, 1e3 / hf_ms / roof32])
        rows.append(["speed-up engine fp32 / transformers", hf_ms / ar32, "", ""])
    table(f"autoregressive decode, {n} new tokens, median of {len(prompts)} prompts",
          ["run", "ms/token", "tok/s", "fraction of roofline"], rows)

    rows = []
    for E, d in args.grid:  # empty grid (--grid ''): autoregressive only
        kw = dict(strategy="self_speculative", exit_layer=E, num_speculations=d)
        ms, acc = engine_run(model, prompts, n, **kw)
        row = [E, d, f"{acc:.2f}", ms, 1e3 / ms, ar32 / ms]
        if ar16 is not None:
            ms16, _ = engine_run(model, prompts, n, weight_dtype=torch.bfloat16, **kw)
            row += [1e3 / ms16, ar16 / ms16]
        if hf is not None and (E, d) in args.hf_grid:
            hms = hf_run(hf, model, prompts[: args.hf_prompts], n, assistant_early_exit=E, num_assistant_tokens=d)
            row += [1e3 / hms]
        else:
            row += ["-"]
        rows.append(row)
    if rows:
        header = ["E", "d", "acceptance", "engine ms/tok", "engine tok/s", "vs engine AR"]
        if ar16 is not None:
            header += ["bf16 tok/s", "bf16 vs bf16 AR"]
        header += ["transformers early-exit tok/s"]
        table(f"self-speculative (fp32 unless noted), {n} new tokens", header, rows)

    table("per-token breakdown, engine autoregressive fp32", ["category", "ms/token", "%"],
          breakdown(model, prompts[0], n))
    if args.grid:
        E, d = args.grid[len(args.grid) // 2]
        table(f"per-token breakdown, engine self-speculative fp32 E={E} d={d}", ["category", "ms/token", "%"],
              breakdown(model, prompts[0], n, strategy="self_speculative", exit_layer=E, num_speculations=d))


def parse_grid(text):
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, ops and strategies (CI)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=5, help="number of prompts (median over them)")
    p.add_argument("--grid", type=parse_grid, default=parse_grid("4:2,6:3,8:4,12:4,16:6,20:6"),
                   help="self-speculative (E, d) pairs as E:d,E:d")
    p.add_argument("--hf-grid", type=parse_grid, default=parse_grid("8:4,16:6"),
                   help="(E, d) pairs also run with transformers assistant_early_exit (slow)")
    p.add_argument("--hf-prompts", type=int, default=2, help="prompts for the transformers early-exit runs")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not engine_mod.is_available():
        sys.exit("the C++ extension is not built")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quick(args) if args.quick else full(args)


if __name__ == "__main__":
    main()
