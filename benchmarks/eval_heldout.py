"""Held-out evaluation of LayerSkip models: the cross-entropy / perplexity of every exit on text they were not
trained on, and a self-speculative (E, d) sweep timed prompt by prompt beside autoregressive decoding.

    python benchmarks/eval_heldout.py --model checkpoints/layerskip-code16 --label layerskip \\
        --model runs/demo16-plain/final --label plain --valid data/corpora/code/valid.txt --out runs/eval-code16

For each model: per exit E the held-out CE, perplexity and top-1 accuracy (`--windows` windows of `--seq-len`
tokens); then `--prompts` prompts of `--prompt-len` tokens spread over the held-out text, each decoded greedily for
`--max-new-tokens` tokens (no early stop) autoregressively and at every (E, d) of the grid, the settings run one
after the other for the same prompt (order rotated from prompt to prompt) so that load changes on a shared machine
hit all of them alike. Per setting: acceptance (accepted / drafted over all prompts), and the median over prompts
of decode tokens/s, time per token and speed-up over that prompt's autoregressive run. Every self-speculative run
is checked to give the autoregressive tokens (greedy decoding is lossless). Writes <out>/<label>/{exits.csv,
sweep.csv, contour.png} and <out>/report.md; prints the tables. Nothing here asserts a time.
"""
from __future__ import annotations

import os

import layerskip_ext  # noqa: E402  (before torch: it sets the OpenMP wait policy before libgomp loads)

import argparse  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from layerskip_ext.training.data import token_stream, valid_windows  # noqa: E402
from layerskip_ext.training.evaluate import exit_metrics  # noqa: E402
from layerskip_ext.training.tokenizer import eos_id  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def held_out_prompts(tokens: torch.Tensor, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` token ids, evenly spread over the held-out stream tokens [N]."""
    stride = (tokens.numel() - length) // count
    if stride < 1:
        raise ValueError(f"held-out text has {tokens.numel()} tokens: too few for {count} prompts of {length}")
    return [tokens[i * stride:i * stride + length].tolist() for i in range(count)]


def exit_table(model, tokens: torch.Tensor, seq_len: int, windows: int) -> list[dict]:
    """Rows {exit, loss, perplexity, accuracy} for every exit on held-out windows [windows, seq_len], computed in
    float32 (a bfloat16 model is upcast: the same weights, without bfloat16 rounding of the activations)."""
    inputs, labels = valid_windows(tokens, seq_len, windows)
    rows = exit_metrics(copy.deepcopy(model.module).float(), inputs, labels, batch_size=8)
    return [dict(r, perplexity=math.exp(r["loss"])) for r in rows]


def sweep(model, prompts: list[list[int]], settings: list[tuple[int, int]], max_new_tokens: int,
          weight_dtype, backend: str, tuned: bool = False) -> tuple[dict, list[dict], dict | None]:
    """(autoregressive summary, one summary per (E, d), summary of the tuned settings or None): medians over
    prompts, acceptance over all prompts. tuned: also run self-speculative decoding at the settings stored with
    the model (`layerskip-ext tune`: E, d, threshold, adaptive, draft-head size K), interleaved like the grid."""
    if tuned and model.settings is None:
        raise ValueError(f"{model.path}: no tuned settings stored with the model (run `layerskip-ext tune`)")
    common = dict(max_new_tokens=max_new_tokens, stop_token_ids=[], backend=backend)
    if backend != "reference":
        common["weight_dtype"] = weight_dtype
    runs = [("autoregressive", None, None)] + [("self_speculative", E, d) for E, d in settings]
    if tuned:  # no exit_layer / num_speculations: generate() takes the settings stored with the model
        runs.append(("tuned", None, None))
    layerskip_ext.generate(model, prompts[0], **dict(common, max_new_tokens=8))  # builds the engine: untimed
    per = {key: [] for key in runs}  # (strategy, E, d) -> [stats per prompt]
    mismatches, ar_outputs = 0, []
    for i, prompt in enumerate(prompts):
        order = runs[i % len(runs):] + runs[:i % len(runs)]
        results = {}
        for key in order:
            strategy, E, d = key
            results[key] = layerskip_ext.generate(model, prompt, strategy=strategy.replace("tuned", "self_speculative"),
                                                  exit_layer=E, num_speculations=d, **common)
        want = results[runs[0]].tokens
        ar_outputs.append(want)
        mismatches += sum(r.tokens != want for r in results.values())
        for key, r in results.items():
            per[key].append(r.stats)
    if mismatches:
        raise RuntimeError(f"{mismatches} self-speculative runs differ from autoregressive decoding (greedy)")
    ar_tpt = [s.time_per_token for s in per[runs[0]]]

    def summary(key):
        stats = per[key]
        drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
        return {"strategy": key[0], "exit_layer": key[1], "num_speculations": key[2],
                "acceptance": accepted / drafted if drafted else None,
                "tokens_per_second": statistics.median(s.tokens_per_second for s in stats),
                "time_per_token_ms": 1e3 * statistics.median(s.time_per_token for s in stats),
                "speedup": statistics.median(a / s.time_per_token for a, s in zip(ar_tpt, stats)),
                "tokens_per_round": statistics.median(s.new_tokens / s.rounds for s in stats) if stats[0].rounds
                else None}
    ar = dict(summary(runs[0]), distinct_4grams=statistics.median(distinct_ngrams(t, 4) for t in ar_outputs))
    grid = [summary(k) for k in runs[1:] if k[0] == "self_speculative"]
    best = None
    if tuned:
        st = model.settings
        best = dict(summary(runs[-1]), exit_layer=st.exit_layer, num_speculations=st.num_speculations,
                    draft_threshold=st.draft_threshold, adaptive=st.adaptive, draft_vocab_size=st.draft_vocab_size)
    return ar, grid, best


def distinct_ngrams(tokens: list[int], n: int) -> float:
    """Distinct n-grams / n-grams of a token list: near 1 for varied text, low when greedy decoding loops."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def exit_markdown(label: str, rows: list[dict]) -> str:
    lines = [f"| exit E ({label}) | held-out CE | perplexity | top-1 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['exit']} | {r['loss']:.3f} | {r['perplexity']:.2f} | {100 * r['accuracy']:.1f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep_markdown(label: str, ar: dict, rows: list[dict], tuned: dict | None = None) -> str:
    lines = [f"{label}: autoregressive {ar['tokens_per_second']:.0f} tokens/s, {ar['time_per_token_ms']:.3f} ms/token; "
             f"its greedy outputs: {100 * ar['distinct_4grams']:.0f}% distinct 4-grams (median; low = loops, which "
             "drafts predict easily)",
             "", "| E | d | acceptance | tokens/round | tokens/s | ms/token | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['exit_layer']} | {r['num_speculations']} | {100 * r['acceptance']:.1f}% | "
                     f"{r['tokens_per_round']:.2f} | {r['tokens_per_second']:.0f} | {r['time_per_token_ms']:.3f} | "
                     f"{r['speedup']:.2f}x |")
    best = max(rows, key=lambda r: r["speedup"])
    lines += ["", f"best fixed (E, d): E={best['exit_layer']} d={best['num_speculations']}: {best['speedup']:.2f}x "
                  f"(acceptance {100 * best['acceptance']:.1f}%)"]
    if tuned is not None:
        t = tuned
        acc = "-" if t["acceptance"] is None else f"{100 * t['acceptance']:.1f}%"
        per_round = "-" if t["tokens_per_round"] is None else f"{t['tokens_per_round']:.2f}"
        lines += ["", f"tuned settings (stored with the model): E={t['exit_layer']} d={t['num_speculations']} "
                      f"threshold={t['draft_threshold']} adaptive={t['adaptive']} K={t['draft_vocab_size'] or 'all'}: "
                      f"acceptance {acc}, {per_round} tokens/round, "
                      f"{t['tokens_per_second']:.0f} tokens/s, {t['time_per_token_ms']:.3f} ms/token, "
                      f"**{t['speedup']:.2f}x** autoregressive"]
    return "\n".join(lines) + "\n"


def contour(label: str, rows: list[dict], path: str) -> None:
    """speed-up over autoregressive as filled contours over (d, E), each measured point annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    Es = sorted({r["exit_layer"] for r in rows})
    ds = sorted({r["num_speculations"] for r in rows})
    grid = [[next(r["speedup"] for r in rows if r["exit_layer"] == E and r["num_speculations"] == d) for d in ds]
            for E in Es]  # [len(Es), len(ds)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if len(Es) > 1 and len(ds) > 1:
        filled = ax.contourf(ds, Es, grid, levels=12, cmap="viridis")
        ax.contour(ds, Es, grid, levels=[1.0], colors="white", linewidths=1.5)  # break-even
        fig.colorbar(filled, ax=ax, label="speed-up over autoregressive")
    for i, E in enumerate(Es):
        for j, d in enumerate(ds):
            ax.annotate(f"{grid[i][j]:.2f}", (d, E), ha="center", va="center", fontsize=7, color="black")
    best = max(rows, key=lambda r: r["speedup"])
    ax.plot(best["num_speculations"], best["exit_layer"], "r*", markersize=14)
    ax.set_xticks(ds)
    ax.set_yticks(Es)
    ax.set_xlim(ds[0] - 0.4, ds[-1] + 0.4)
    ax.set_ylim(Es[0] - 0.4, Es[-1] + 0.4)
    ax.set(xlabel="draft length d (num_speculations)", ylabel="exit layer E",
           title=f"{label}: self-speculative speed-up (median over prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: str, rows: list[dict]) -> None:
    """One line per row; the columns are every key of any row, in order of first appearance (blank if absent)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True,
                    help="model directory or .gguf file (repeatable); 'default': layerskip_ext.load()'s SmolLM2")
    ap.add_argument("--label", action="append", default=[], help="a name per --model (default: folder name)")
    ap.add_argument("--valid", nargs="+", required=True, help="held-out text files (not trained on)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--exit-layers", type=_ints, default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--num-speculations", type=_ints, default=[1, 2, 3, 4, 6])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256, help="held-out CE windows: tokens per window")
    ap.add_argument("--windows", type=int, default=128, help="held-out CE windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-dtype", choices=sorted(_DTYPES), default=None,
                    help="the engine's matmul weights (default: the model's dtype)")
    ap.add_argument("--backend", choices=("engine", "reference"), default="engine")
    ap.add_argument("--tuned", action="store_true",
                    help="also run the self-speculative settings stored with each model (layerskip-ext tune)")
    args = ap.parse_args(argv)
    labels = args.label or [os.path.basename(os.path.normpath(m)) for m in args.model]
    if len(labels) != len(args.model):
        ap.error(f"{len(args.model)} --model but {len(labels)} --label")
    if args.prompts < 1 or args.max_new_tokens < 2 or args.threads < 1:
        ap.error("--prompts and --threads must be >= 1 and --max-new-tokens >= 2")
    if args.backend == "engine" and not layerskip_ext.engine.is_available():
        ap.error("the C++ engine is not built (pip install -e .); timing the reference backend means little")
    torch.set_num_threads(args.threads)
    os.environ["LAYERSKIP_THREADS"] = str(args.threads)  # a fixed count: no drop to one thread under contention
    os.makedirs(args.out, exist_ok=True)
    report = [f"Held-out evaluation: {', '.join(args.valid)}; {args.prompts} prompts x {args.prompt_len} tokens, "
              f"{args.max_new_tokens} new tokens (greedy, no early stop), {args.threads} threads, "
              f"backend {args.backend}; CE over {args.windows} windows x {args.seq_len} tokens.", ""]
    for label, path in zip(labels, args.model):
        model = layerskip_ext.load(None if path == "default" else path)
        tokens = token_stream(model.tokenizer, args.valid, eos_id(model.tokenizer))  # [N]
        exits = exit_table(model, tokens, args.seq_len, args.windows)
        settings = [(E, d) for E in args.exit_layers if E < model.num_layers for d in args.num_speculations]
        prompts = held_out_prompts(tokens, args.prompts, args.prompt_len)
        dtype = _DTYPES[args.weight_dtype] if args.weight_dtype else None
        ar, rows, tuned = sweep(model, prompts, settings, args.max_new_tokens, dtype, args.backend, args.tuned)
        d = os.path.join(args.out, label)
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "exits.csv"), exits)
        write_csv(os.path.join(d, "sweep.csv"), [ar] + rows + ([dict(tuned, strategy="tuned")] if tuned else []))
        contour(label, rows, os.path.join(d, "contour.png"))
        text = f"## {label} ({path})\n\n" + exit_markdown(label, exits) + "\n" + sweep_markdown(label, ar, rows, tuned)
        print(text, flush=True)
        report.append(text)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(report))
    print(f"wrote {args.out}/report.md and per-model exits.csv, sweep.csv, contour.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
