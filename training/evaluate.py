"""Per-exit evaluation: loss and top-1 next-token accuracy of every exit layer on held-out text, and the greedy
self-speculative acceptance rate per exit layer (layers [0, E) draft, the full model verifies), as a table
(markdown + JSON) and a PNG plot that can overlay several models."""
from __future__ import annotations

import json
import os

import torch

import layerskip_ext
from layerskip_ext.model import LayerSkipModel

from .data import token_stream, valid_windows
from .model import residual_states
from .tokenizer import eos_id


@torch.no_grad()
def exit_metrics(lm, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """[{exit (1-based), loss, accuracy}] for every layer of `lm` (HF or reference): the per-exit cross-entropy
    and top-1 accuracy of lm_head(norm(x_E)), used by the trainer's validation and by the evaluation report.

    inputs, labels: held-out windows [N, T] (labels -100 where there is nothing to predict)."""
    L = len(lm.model.layers)
    device = lm.lm_head.weight.device
    loss_sum = torch.zeros(L, dtype=torch.float64)
    correct = torch.zeros(L, dtype=torch.int64)
    count = 0
    for s in range(0, inputs.shape[0], batch_size):
        x, y = inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)  # [b, T]
        mask = y != -100  # [b, T]
        for l, h in residual_states(lm, x).items():
            logits = lm.lm_head(lm.model.norm(h)).float()[mask]  # [n, V] the labelled positions
            loss_sum[l] += float(torch.nn.functional.cross_entropy(logits, y[mask], reduction="sum"))
            correct[l] += int((logits.argmax(-1) == y[mask]).sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("exit_metrics: the labels mark no position to predict (all -100)")
    return [{"exit": l + 1, "loss": float(loss_sum[l] / count), "accuracy": float(correct[l] / count)}
            for l in range(L)]


def acceptance_rates(model: LayerSkipModel, prompts: list[list[int]], exits: list[int], num_speculations: int = 4,
                     max_new_tokens: int = 64, backend: str = "auto") -> dict[int, float]:
    """{exit E: accepted / drafted} of greedy self-speculative decoding summed over `prompts` (token id lists).
    The backends give the same tokens and counts; "auto" is the C++ engine when it is built."""
    rates = {}
    for e in exits:
        if e >= model.num_layers:
            continue  # the last layer drafts for itself: nothing to measure
        drafted = accepted = 0
        for p in prompts:
            r = layerskip_ext.generate(model, p, max_new_tokens=max_new_tokens, strategy="self_speculative",
                                       exit_layer=e, num_speculations=num_speculations, stop_token_ids=[],
                                       backend=backend)
            drafted += r.stats.drafted
            accepted += r.stats.accepted
        rates[e] = accepted / drafted if drafted else 0.0
    return rates


def evaluate_model(model: LayerSkipModel, valid_files: list[str], seq_len: int = 256, windows: int = 32,
                   accept_exits: list[int] | None = None, prompts: int = 4, prompt_len: int = 64,
                   max_new_tokens: int = 64, num_speculations: int = 4, backend: str = "auto") -> list[dict]:
    """Rows {exit, loss, accuracy, acceptance_rate} for every exit (1-based); the acceptance rate (the costly part)
    is measured at `accept_exits` (default: every exit but the last) and None elsewhere."""
    tokens = token_stream(model.tokenizer, valid_files, eos_id(model.tokenizer))
    inputs, labels = valid_windows(tokens, seq_len, windows)
    rows = exit_metrics(model.module, inputs, labels)
    exits = accept_exits or [r["exit"] for r in rows]
    # prompts from the held-out text, spread over it, none overlapping the first window's start
    step = max(1, (tokens.numel() - prompt_len) // (prompts + 1))
    prompt_ids = [tokens[(i + 1) * step:(i + 1) * step + prompt_len].tolist() for i in range(prompts)]
    rates = acceptance_rates(model, prompt_ids, exits, num_speculations, max_new_tokens, backend)
    return [dict(r, acceptance_rate=rates.get(r["exit"])) for r in rows]


def markdown_table(results: dict[str, list[dict]]) -> str:
    """One row per exit, columns loss / accuracy / acceptance rate for each labelled model."""
    labels = list(results)
    head = "| exit |" + "".join(f" {k} loss | {k} acc | {k} accept |" for k in labels)
    sep = "|---:|" + "---:|---:|---:|" * len(labels)
    exits = sorted({r["exit"] for rows in results.values() for r in rows})
    lines = [head, sep]
    for e in exits:
        cells = []
        for k in labels:
            r = next((r for r in results[k] if r["exit"] == e), None)
            if r is None:
                cells += ["", "", ""]
                continue
            acc = r["acceptance_rate"]
            cells += [f"{r['loss']:.3f}", f"{100 * r['accuracy']:.1f}%", "-" if acc is None else f"{100 * acc:.1f}%"]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: str, title: str = "") -> None:
    """per_layer.png: top-1 accuracy (left) and self-speculative acceptance rate (right) against the exit layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in results.items():
        a.plot([r["exit"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=label)
        acc = [(r["exit"], 100 * r["acceptance_rate"]) for r in rows if r["acceptance_rate"] is not None]
        if acc:
            b.plot(*zip(*acc), marker="o", label=label)
    a.set(xlabel="exit layer", ylabel="top-1 next-token accuracy (%)", title="accuracy per exit")
    b.set(xlabel="exit layer (draft)", ylabel="acceptance rate (%)", title="self-speculative acceptance (greedy)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, list[dict]], out_dir: str, title: str = "") -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown_table(results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(out_dir, "per_layer.png"), title)
    return table


def evaluate_command(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = args.label or [os.path.basename(os.path.normpath(m)) for m in args.model]
    if len(labels) != len(args.model):
        raise SystemExit(f"{len(args.model)} --model but {len(labels)} --label")
    for name in ("seq_len", "windows", "prompts", "prompt_len", "max_new_tokens", "num_speculations"):
        if getattr(args, name) < 1:  # --seq-len 0 was a ZeroDivisionError, --windows 0 a misleading message
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        exits = None if args.accept_exits is None else [int(e) for e in args.accept_exits.split(",")]
    except ValueError:
        raise ValueError(f"--accept-exits must be comma-separated layer numbers, got {args.accept_exits!r}") from None
    results = {}
    for path in args.merge:
        with open(path) as f:
            results.update(json.load(f))
    if not results and not args.model:
        raise SystemExit("nothing to evaluate: give --model or --merge")
    if args.model and not args.valid:
        raise SystemExit("--valid (held-out text files) is needed to evaluate a --model")
    for label, path in zip(labels, args.model):
        model = layerskip_ext.load(None if path == "default" else path)
        bad = [e for e in exits or [] if not 1 <= e <= model.num_layers]
        if bad:  # were skipped silently (the acceptance column showed "-")
            raise ValueError(f"--accept-exits {bad} out of range for {path}: exits are 1..{model.num_layers}")
        results[label] = evaluate_model(model, args.valid, args.seq_len, args.windows, exits, args.prompts,
                                        args.prompt_len, args.max_new_tokens, args.num_speculations, args.backend)
    print(write_report(results, args.out, title=", ".join(results)))
    print(f"wrote {args.out}/results.json, table.md, per_layer.png")
    return 0
