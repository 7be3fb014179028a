"""The engine and the ops on a GPU (or the CPU): tokens/s per strategy against the memory-bandwidth roofline, and
the time of one decode step of our ops run eagerly versus replayed from a CUDA graph.

    python benchmarks/bench_cuda.py --device cuda                          # a random 12-layer model
    python benchmarks/bench_cuda.py --device cuda --model checkpoints/layerskip-demo --exit-layer 3 -d 2
    python benchmarks/bench_cuda.py --device cpu --quick                   # the same tables on the CPU

Roofline: bytes of weights one full decode step reads (Engine.weight_bytes_per_token) / the device's measured
copy bandwidth (bytes read + written per second of a 1 GiB device-to-device copy); the fraction is measured
tokens/s over that bound (above 1 for early exit and accepted speculation, which read fewer layers per token).
Batch sizes the engine does not support are listed as such. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from bench_common import table  # noqa: E402  (benchmarks/ is the script's directory)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes=1 << 30, reps=10) -> float:
    """Median GB/s (bytes read + written) of a device-to-device copy of nbytes."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9



def random_model(device, layers, hidden, heads, kv_heads, inter, vocab, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        return layerskip_ext.load(d, dtype=dtype, device=device)


def strategies(model, exit_layer, d):
    E = exit_layer or max(1, model.num_layers // 2)
    return [("autoregressive", {}), (f"early_exit E={E}", dict(strategy="early_exit", exit_layer=E)),
            (f"self_speculative E={E} d={d}", dict(strategy="self_speculative", exit_layer=E, num_speculations=d)),
            (f"self_speculative E={E} d={d} t=0.8",
             dict(strategy="self_speculative", exit_layer=E, num_speculations=d, temperature=0.8, seed=1))]


def bench_strategies(model, args, bandwidth, weight_dtype):
    eng = engine_mod.get_engine(model, weight_dtype)
    bytes_per_token = eng.weight_bytes_per_token
    roofline = bandwidth * 1e9 / bytes_per_token  # tokens/s of a batch-1 full decode step that only reads weights
    rows = []
    for name, kw in strategies(model, args.exit_layer, args.d):
        for batch in args.batch:
            prompts = [list(range(3 + b, 3 + b + args.prompt_tokens)) for b in range(batch)]
            gen = dict(max_new_tokens=args.tokens, stop_token_ids=[], weight_dtype=weight_dtype, **kw)
            layerskip_ext.generate(model, prompts if batch > 1 else prompts[0], **dict(gen, max_new_tokens=8))
            tps, acc = [], None
            for _ in range(args.repeats):
                sync(model.device)
                t0 = time.perf_counter()
                out = layerskip_ext.generate(model, prompts if batch > 1 else prompts[0], **gen)
                wall = time.perf_counter() - t0
                results = out if batch > 1 else [out]
                # batch 1: decode tokens/s from the engine's stats (prefill excluded); batch > 1: wall clock of
                # the whole call over all new tokens (prefills included)
                tps.append(results[0].stats.tokens_per_second if batch == 1 else
                           sum(r.stats.new_tokens for r in results) / wall)
                drafted = sum(r.stats.drafted for r in results)
                acc = sum(r.stats.accepted for r in results) / drafted if drafted else None
            t = statistics.median(tps)
            rows.append([name, batch, t, t / roofline, 1e3 * batch / t, "-" if acc is None else f"{acc:.2f}"])
    table(f"engine on {model.device}, {str(weight_dtype).replace('torch.', '')} weights: {bytes_per_token / 1e6:.1f} MB "
          f"per token, batch-1 roofline {roofline:.0f} tok/s at {bandwidth:.0f} GB/s ({args.tokens} new tokens per "
          f"row, median of {args.repeats})",
          ["strategy", "batch", "tok/s (all rows)", "of batch-1 roofline", "ms/step", "acceptance"],
          rows, float_format=".4g")


def decode_step_fn(model, weight_dtype, position):
    """One decode step (all layers, final norm, LM head, greedy sample) of our ops on fixed buffers."""
    from layerskip_ext import ops as wrappers

    raw = torch.ops.layerskip
    c, m, dev = model.config, model.module, model.device
    H, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    S = position + 8
    table_ = m.rope_cache().to(dev)
    layers = []
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        layers.append(dict(
            n1=layer.input_layernorm.weight.detach().float(), n2=layer.post_attention_layernorm.weight.detach().float(),
            qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().to(weight_dtype),
            o=a.o_proj.weight.detach().to(weight_dtype),
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().to(weight_dtype),
            down=mlp.down_proj.weight.detach().to(weight_dtype),
            k=torch.randn(1, Hkv, S, D, device=dev), v=torch.randn(1, Hkv, S, D, device=dev)))
    final_norm = m.model.norm.weight.detach().float()
    head = m.lm_head.weight.detach().to(weight_dtype)
    x = torch.randn(1, H, device=dev)
    temperature = torch.zeros(1, dtype=torch.float64, device=dev)  # greedy
    top_k, seeds, counters = (torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(3))
    top_p = torch.ones(1, dtype=torch.float64, device=dev)
    pos = torch.tensor([position], device=dev)
    row = torch.zeros(1, dtype=torch.int64, device=dev)

    def step():
        h = x.clone()
        for w in layers:
            a = wrappers.rms_norm(h, w["n1"], 1e-5)
            qkv = wrappers.linear(a, w["qkv"])
            q = qkv[:, : Hq * D].view(1, Hq, D)
            k = qkv[:, Hq * D : (Hq + Hkv) * D].view(1, Hkv, D)
            v = qkv[:, (Hq + Hkv) * D :].view(1, Hkv, D)
            wrappers.rotary_embedding(q, k, pos, table_)
            wrappers.kv_cache_write(w["k"], w["v"], k, v, row, pos)
            attn = torch.empty_like(q)
            raw.attention(attn, q, w["k"], w["v"], row, pos, D**-0.5)
            a2 = wrappers.fused_add_rms_norm(wrappers.linear(attn.view(1, Hq * D), w["o"]), h, w["n2"], 1e-5)
            h = h + wrappers.linear(wrappers.silu_and_mul(wrappers.linear(a2, w["gate_up"])), w["down"])
        logits = wrappers.linear(wrappers.rms_norm(h, final_norm, 1e-5), head)
        tokens = torch.empty(1, dtype=torch.int64, device=dev)
        raw.sample(tokens, logits, temperature, top_k, top_p, seeds, counters)
        return tokens

    return step


def bench_graph(model, args, weight_dtype):
    dev = model.device
    rows = []
    if dev.type == "cuda":  # the engine: every step eager vs replayed from captured graphs
        eng = engine_mod.get_engine(model, weight_dtype)
        prompt = list(range(3, 3 + args.prompt_tokens))
        for name, kw in strategies(model, args.exit_layer, args.d)[:3]:
            for batch in (1, 8):
                prompts = [list(range(3 + b, 3 + b + args.prompt_tokens)) for b in range(batch)]
                times = {}
                for graphs in (False, True):
                    eng.set_cuda_graphs(graphs)
                    gen = dict(max_new_tokens=args.tokens, stop_token_ids=[], weight_dtype=weight_dtype, **kw)
                    layerskip_ext.generate(model, prompts if batch > 1 else prompt, **gen)  # warm-up / capture
                    ms = []
                    for _ in range(args.repeats):
                        out = layerskip_ext.generate(model, prompts if batch > 1 else prompt, **gen)
                        r = out[0] if batch > 1 else out
                        ms.append(r.stats.decode_time_s * 1e3 / max(r.stats.rounds or r.stats.new_tokens - 1, 1))
                    times[graphs] = statistics.median(ms)
                rows.append([f"engine {name}", batch, times[False], times[True], times[False] / times[True]])
        eng.set_cuda_graphs(True)
    step = decode_step_fn(model, weight_dtype, position=args.prompt_tokens)
    for _ in range(3):
        step()  # warm-up
    sync(dev)
    n = args.steps
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    eager = (time.perf_counter() - t0) / n * 1e3
    if dev.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            graph.replay()
        sync(dev)
        replay = (time.perf_counter() - t0) / n * 1e3
        rows.append(["ops from Python, one decode step", 1, eager, replay, eager / replay])
    else:
        rows.append(["ops from Python, one decode step", 1, eager, "n/a on the CPU", ""])
    table(f"step time, eager vs CUDA graph ({model.num_layers} layers; engine: ms per decode step or speculative "
          f"round of row 0, median of {args.repeats})", ["what", "batch", "eager ms", "graph ms", "speed-up"],
          rows, float_format=".4g")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="a checkpoint directory (default: a random model)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--exit-layer", type=int, default=None)
    p.add_argument("-d", type=int, default=3, help="num_speculations")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--weight-dtype", choices=["float32", "bfloat16", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="a tiny model, few tokens (seconds)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.tokens, args.repeats, args.steps = 4, 256, 4096, 32, 1, 5
    if args.model:
        model = layerskip_ext.load(args.model, device=device)
        name = args.model
    else:
        model = random_model(device, args.layers, args.hidden, args.hidden // 64, max(1, args.hidden // 256),
                             args.hidden * 3, args.vocab, torch.float32)
        name = f"random Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}"
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
        bandwidth = copy_bandwidth(device)
    else:
        from memory_bandwidth import read_bandwidth

        bandwidth = read_bandwidth()
    print(f"model: {name}; measured bandwidth {bandwidth:.0f} GB/s")
    dtypes = {"float32": [torch.float32], "bfloat16": [torch.bfloat16],
              "both": [torch.float32, torch.bfloat16]}[args.weight_dtype]
    with torch.inference_mode():
        for wd in dtypes:
            bench_strategies(model, args, bandwidth, wd)
        bench_graph(model, args, dtypes[-1])


if __name__ == "__main__":
    main()
