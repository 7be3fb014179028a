"""`layerskip-ext tune`: sweep the self-speculative settings of a model on sample prompts and store the best.

For every exit layer E, draft length d, draft threshold, adaptive mode and draft-head size K, greedy
generations over the sample prompts give tokens/s; the speed-up is the median over prompts of the ratio to
autoregressive decoding of the same prompt, run right before or after it (alternately). Writes a CSV (one row per setting), a PNG contour plot of the best speed-up
over E x d, and the best settings beside the model (settings.py), which generate() then uses by default.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import dataclass

from .errors import LayerSkipError
from .settings import Settings, save_settings


@dataclass
class Point:
    exit_layer: int
    num_speculations: int
    draft_threshold: float
    adaptive: bool
    draft_vocab_size: int
    acceptance: float
    tokens_per_s: float
    speedup: float


def prompts_from_text(model, text: str, count: int = 8, length: int = 48) -> list[list[int]]:
    """`count` prompts of `length` tokens taken at even steps through a text (token ids)."""
    ids = model.encode(text)
    if len(ids) < length + 1:
        raise LayerSkipError(f"the text has {len(ids)} tokens; need at least {length + 1} to cut a prompt")
    step = max(1, (len(ids) - length) // count)
    return [ids[i:i + length] for i in range(0, len(ids) - length, step)][:count]


def prompts_from_file(path: str) -> list[str]:
    """One prompt per non-empty line; the two characters \\n in a line stand for a newline."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise LayerSkipError(f"{path}: no prompts (one prompt per non-empty line)")
    return prompts


def _decode_rate(model, prompt, **kwargs) -> tuple[float, int, int]:
    """(decoded tokens / decode seconds of one greedy generation, drafted, accepted)."""
    import layerskip_ext
    r = layerskip_ext.generate(model, prompt, stop_token_ids=[], **kwargs)
    seconds = r.stats.decode_time_s
    return (max(r.stats.new_tokens - 1, 0) / seconds if seconds > 0 else 0.0), r.stats.drafted, r.stats.accepted


def _paired(model, prompts, repeats: int, common: dict, setting: dict) -> tuple[float, float, float, float]:
    """Autoregressive and self-speculative decoding of each prompt back to back (which goes first alternates),
    `repeats` times: (median over the pairs of the speed-up, median self-speculative tokens/s, median
    autoregressive tokens/s, acceptance rate). Pairing keeps a shared machine's drifting load out of the ratio."""
    ratios, ss_rates, ar_rates, drafted, accepted = [], [], [], 0, 0
    for rep in range(repeats):
        for i, p in enumerate(prompts):
            runs = {}
            for kind in (("ar", "ss") if (rep + i) % 2 == 0 else ("ss", "ar")):
                kwargs = dict(common, **setting) if kind == "ss" else common
                runs[kind] = _decode_rate(model, p, **kwargs)
            (ar, _, _), (ss, dr, ac) = runs["ar"], runs["ss"]
            ar_rates.append(ar)
            ss_rates.append(ss)
            ratios.append(ss / ar if ar > 0 else 0.0)
            drafted += dr
            accepted += ac
    return (statistics.median(ratios), statistics.median(ss_rates), statistics.median(ar_rates),
            accepted / drafted if drafted else 0.0)


def sweep(model, prompts, exit_layers, draft_lengths, thresholds, adaptive_modes, max_new_tokens=64, repeats=1,
          backend="auto", log=print, draft_vocab_sizes=(0,)) -> tuple[float, list[Point]]:
    """(median autoregressive tokens/s, one Point per setting). Every setting's speed-up is the median over
    prompts (x repeats) of self-speculative over autoregressive decoding of the same prompt, run back to back."""
    common = dict(max_new_tokens=max_new_tokens, backend=backend)
    for p in prompts:  # warm up: engine build, cache growth, first-touch of buffers
        _decode_rate(model, p, **common)
    points, bases = [], []
    for E in exit_layers:
        for d in draft_lengths:
            for threshold in thresholds:
                for adaptive in adaptive_modes:
                    for k in draft_vocab_sizes:
                        setting = dict(strategy="self_speculative", exit_layer=E, num_speculations=d,
                                       draft_threshold=threshold, adaptive=adaptive, draft_vocab_size=k)
                        speedup, tps, ar, acc = _paired(model, prompts, repeats, common, setting)
                        bases.append(ar)
                        points.append(Point(E, d, threshold, adaptive, k, acc, tps, speedup))
                        log(f"E={E} d={d} threshold={threshold} adaptive={adaptive} K={k or 'all'}: {tps:.1f} "
                            f"tokens/s ({speedup:.2f}x), acceptance {acc:.1%}")
    base = statistics.median(bases)
    log(f"autoregressive: median {base:.1f} tokens/s over the sweep ({min(bases):.1f} .. {max(bases):.1f})")
    return base, points


def write_csv(path: str, points: list[Point]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["exit_layer", "num_speculations", "draft_threshold", "adaptive", "draft_vocab_size", "acceptance",
                    "tokens_per_s", "speedup"])
        for p in points:
            w.writerow([p.exit_layer, p.num_speculations, p.draft_threshold, int(p.adaptive), p.draft_vocab_size,
                        f"{p.acceptance:.4f}", f"{p.tokens_per_s:.2f}", f"{p.speedup:.4f}"])


def plot(path: str, points: list[Point], title: str) -> None:
    """Contour plot of the best speed-up (over thresholds and modes) on the E x d grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    exits = sorted({p.exit_layer for p in points})
    ds = sorted({p.num_speculations for p in points})
    best = np.zeros((len(ds), len(exits)))  # [d, E]
    for p in points:
        i, j = ds.index(p.num_speculations), exits.index(p.exit_layer)
        best[i, j] = max(best[i, j], p.speedup)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(exits) >= 2 and len(ds) >= 2:
        cs = ax.contourf(exits, ds, best, levels=12, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="speed-up over autoregressive")
        if best.min() < 1.0 < best.max():
            ax.contour(exits, ds, best, levels=[1.0], colors="white", linewidths=1.5)
    else:  # one row or column: no contour possible, a heat map of the cells
        im = ax.imshow(best, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(exits)), exits)
        ax.set_yticks(range(len(ds)), ds)
        fig.colorbar(im, ax=ax, label="speed-up over autoregressive")
    for i, d in enumerate(ds):
        for j, E in enumerate(exits):
            x, y = (E, d) if len(exits) >= 2 and len(ds) >= 2 else (j, i)
            ax.annotate(f"{best[i, j]:.2f}", (x, y), ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("exit layer E")
    ax.set_ylabel("draft length d")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(model, prompts, out_dir: str, exit_layers, draft_lengths, thresholds, adaptive_modes, max_new_tokens=64,
         repeats=1, backend="auto", save=True, log=print, draft_vocab_sizes=(0,)) -> tuple[Point, str | None]:
    """Runs the sweep, writes out_dir/tune.csv and out_dir/tune.png, stores the best settings with the model
    (unless save is False or the model has no path). Returns (best point, settings file or None)."""
    L = model.num_layers
    for E in exit_layers:
        if not 1 <= E <= L - 1:
            raise LayerSkipError(f"exit layer {E} is outside [1, {L - 1}] for a model with {L} layers")
    for d in draft_lengths:
        if d < 1:
            raise LayerSkipError(f"draft length {d} must be >= 1")
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise LayerSkipError(f"threshold {t} must be in [0, 1]")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    base, points = sweep(model, prompts, exit_layers, draft_lengths, thresholds, adaptive_modes, max_new_tokens,
                         repeats, backend, log, draft_vocab_sizes)
    write_csv(os.path.join(out_dir, "tune.csv"), points)
    name = os.path.basename(os.path.normpath(model.path)) if model.path else "model"
    plot(os.path.join(out_dir, "tune.png"), points, f"{name}: self-speculative speed-up (greedy)")
    best = max(points, key=lambda p: p.speedup)
    log(f"best: E={best.exit_layer} d={best.num_speculations} threshold={best.draft_threshold} "
        f"adaptive={best.adaptive} K={best.draft_vocab_size or 'all'}: {best.speedup:.2f}x, "
        f"acceptance {best.acceptance:.1%} "
        f"(sweep took {time.perf_counter() - t0:.0f} s)")
    if best.speedup < 1.0:
        log(f"warning: no setting was faster than autoregressive decoding on these prompts (best {best.speedup:.2f}x):"
            " self-speculation does not pay for this model on this machine")
    stored = None
    if save and model.path is not None:
        measured = dict(speedup=round(best.speedup, 4), acceptance=round(best.acceptance, 4),
                        tokens_per_s=round(best.tokens_per_s, 2), autoregressive_tokens_per_s=round(base, 2),
                        prompts=len(prompts), max_new_tokens=max_new_tokens, repeats=repeats)
        settings = Settings(exit_layer=best.exit_layer, num_speculations=best.num_speculations,
                            draft_threshold=best.draft_threshold, adaptive=best.adaptive,
                            draft_vocab_size=best.draft_vocab_size, measured=measured)
        stored = save_settings(model.path, settings, L)
        log(f"settings stored in {stored}")
    return best, stored
