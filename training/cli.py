"""`layerskip-ext train ...` / `python -m layerskip_ext.training ...`: run a recipe, evaluate exits, compare runs.

  train    --config FILE [--set section.key=value ...]   (also under torchrun --nproc_per_node N)
  eval     --model DIR [--model DIR ...] --valid FILE ... --out DIR   per-layer loss / accuracy / acceptance
  configs  list the bundled recipe configs
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import default_config_dir, load_config


def _resolve_config(path: str) -> str:
    """A config path, or the name of a bundled config (e.g. 'demo-layerskip')."""
    if os.path.isfile(path):
        return path
    for ext in (".yaml", ".yml", ".json"):
        candidate = os.path.join(default_config_dir(), path + ext)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config {path!r} is neither a file nor a bundled config "
                            f"({', '.join(sorted(os.listdir(default_config_dir())))})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="layerskip-ext train", description="LayerSkip training recipes")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a training recipe (pretrain / continual / finetune)")
    t.add_argument("--config", required=True, help="JSON/YAML file or the name of a bundled config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set train.steps=100 (values are JSON)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="per-exit loss, top-1 accuracy and self-speculative acceptance rate")
    e.add_argument("--model", action="append", default=[],
                   help="checkpoint directory ('default' for SmolLM2-135M); repeat to compare")
    e.add_argument("--label", action="append", help="a name per --model for the table and plot")
    e.add_argument("--valid", nargs="+", default=[], help="held-out text files")
    e.add_argument("--out", required=True, help="folder for results.json, table.md and per_layer.png")
    e.add_argument("--merge", nargs="*", default=[], help="results.json files of earlier evals to include")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--windows", type=int, default=32, help="number of held-out windows of seq-len tokens")
    e.add_argument("--accept-exits", type=str, default=None,
                   help="comma-separated 1-based exits whose acceptance rate is measured (default all)")
    e.add_argument("--prompts", type=int, default=4, help="prompts for the acceptance rate")
    e.add_argument("--prompt-len", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--num-speculations", type=int, default=4)
    e.add_argument("--backend", choices=("auto", "engine", "reference"), default="auto",
                   help="decoder for the acceptance runs (same tokens and counts; auto = engine when built)")
    e.add_argument("--threads", type=int, default=0)
    sub.add_parser("configs", help="list the bundled configs")
    # `layerskip-ext train --config ...` arrives here without the sub-command word
    if argv and argv[0] not in ("train", "eval", "configs", "-h", "--help"):
        argv = ["train"] + argv
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad config, data or paths: a message, not a traceback
        print(f"layerskip-ext train: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "configs":
        for name in sorted(os.listdir(default_config_dir())):
            print(os.path.join(default_config_dir(), name))
        return 0
    if args.command == "train":
        from .trainer import train
        cfg = load_config(_resolve_config(args.config), args.overrides)
        result = train(cfg, progress=not args.no_progress)
        if result["rank"] == 0:
            print(json.dumps({k: v for k, v in result.items() if k not in ("rank", "model", "tokenizer")}, indent=1))
        return 0
    from .evaluate import evaluate_command
    return evaluate_command(args)


if __name__ == "__main__":
    sys.exit(main())
