"""Command line: layerskip-ext generate | chat | serve | bench | sweep | tune | draft-vocab | train."""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_REQUEST = "Write a short story about a lighthouse keeper."


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--weights", default="auto", choices=["auto", "q8_0", "q4_0", "q4_1", "bf16", "fp32"],
                   help="matmul weights: auto keeps a GGUF's Q8_0/Q4_0/Q4_1 blocks packed and a HF checkpoint's "
                        "floats; q8_0/q4_0/q4_1 quantize on load; bf16/fp32 dequantize (see load())")
    p.add_argument("--threads", type=int, default=None,
                   help="threads (default: torch's count, one while other processes fill every core)")
    p.add_argument("--backend", default="auto", choices=["auto", "engine", "reference"])


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--strategy", default="self_speculative",
                   choices=["autoregressive", "early_exit", "self_speculative"])
    p.add_argument("--exit-layer", type=int, default=None,
                   help="E (default: the model's tuned settings, else a quarter of the layers)")
    p.add_argument("--num-speculations", type=int, default=None, help="d, tokens drafted per round")
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="stop a round's drafting below this top probability (default: tuned settings, else 0)")
    p.add_argument("--adaptive", default=None, action=argparse.BooleanOptionalAction,
                   help="adapt the draft length and switch drafting off when it does not pay")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


MAX_THREADS = 256  # --threads above this is refused (torch.set_num_threads(100000) crashed the process)


def _check_speed_run(args) -> None:
    """bench / sweep measure tokens/s over the tokens after the first: at least 2 new tokens, at least 1 repeat."""
    if args.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens must be >= 2 to measure a speed, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")


def _speedup(tps: float, base: float) -> str:
    return f"{tps / base:>8.2f}x" if base > 0 else f"{'n/a':>9}"


def _load(args):
    import layerskip_ext
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:  # checked before torch creates that many threads (it crashed)
            raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["LAYERSKIP_THREADS"] = str(args.threads)  # an explicit choice overrides the engine's default
    return layerskip_ext.load(args.model, dtype=DTYPES[args.dtype], weights=getattr(args, "weights", "auto"))


def _exit_layer(args, model):
    if args.exit_layer is not None or args.strategy == "autoregressive":
        return args.exit_layer
    if args.strategy == "self_speculative" and model.settings is not None and args.num_speculations is None:
        return None  # generate() takes E and d from the tuned settings
    return max(1, model.num_layers // 4)


def _decode_kwargs(args, model):
    return dict(max_new_tokens=args.max_new_tokens, strategy=args.strategy, exit_layer=_exit_layer(args, model),
                num_speculations=args.num_speculations, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, backend=args.backend, draft_threshold=args.draft_threshold,
                adaptive=args.adaptive)


def _default_prompt(model) -> str:
    """DEFAULT_REQUEST as a user turn in the model's own chat template; the bare request without one."""
    from layerskip_ext.chat import apply_chat_template, find_chat_template
    if find_chat_template(model.path) is None:
        return DEFAULT_REQUEST
    return apply_chat_template(model, [{"role": "user", "content": DEFAULT_REQUEST}])


def cmd_generate(args) -> int:
    import layerskip_ext
    model = _load(args)
    prompt = args.prompt if args.prompt is not None else _default_prompt(model)
    print(prompt, end="", flush=True)
    streamed: list[int] = []

    def on_token(token: int) -> None:  # print text as it is accepted
        before = model.decode(streamed)
        streamed.append(token)
        print(model.decode(streamed)[len(before):], end="", flush=True)

    result = layerskip_ext.generate(model, prompt, on_token=on_token if args.stream else None,
                                    **_decode_kwargs(args, model))
    if not args.stream:
        print(result.text, end="")
    s = result.stats
    print("\n" + "-" * 60)
    print(f"strategy {s.strategy}  exit_layer {s.exit_layer}  num_speculations {s.num_speculations}  "
          f"finish {result.finish_reason}")
    print(f"prompt {s.prompt_tokens} tokens, prefill {s.prefill_time_s * 1e3:.1f} ms; "
          f"{s.new_tokens} new tokens, {s.tokens_per_second:.1f} tokens/s ({s.time_per_token * 1e3:.1f} ms/token)")
    if s.acceptance_rate is not None:
        print(f"acceptance rate {s.acceptance_rate:.1%} ({s.accepted}/{s.drafted} drafted, {s.rounds} rounds)")
    return 0


def _median_run(model, prompt, repeats: int, **kwargs):
    """(median tokens/s over `repeats` generations, the first run's stats)."""
    import layerskip_ext
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    runs = [layerskip_ext.generate(model, prompt, **kwargs) for _ in range(repeats)]
    return statistics.median(r.stats.tokens_per_second for r in runs), runs[0].stats


def cmd_bench(args) -> int:
    """Median tokens/s of each strategy on one prompt."""
    import layerskip_ext
    _check_speed_run(args)
    model = _load(args)
    args.prompt = args.prompt if args.prompt is not None else _default_prompt(model)
    # neither --exit-layer nor --num-speculations: the settings stored with the model (`tune`), when it has some
    tuned = model.settings if args.exit_layer is None and args.num_speculations is None else None
    if tuned is not None:
        E, d = tuned.exit_layer, None  # generate() fills E, d, threshold, adaptive and K from the settings
    else:  # 0 is an error, not a default
        E = max(1, model.num_layers // 4) if args.exit_layer is None else args.exit_layer
        d = 4 if args.num_speculations is None else args.num_speculations
    rows = []
    for strategy in ("autoregressive", "early_exit", "self_speculative"):
        kwargs = dict(max_new_tokens=args.max_new_tokens, strategy=strategy, stop_token_ids=[], backend=args.backend,
                      exit_layer=None if strategy == "autoregressive" or (tuned and strategy == "self_speculative")
                      else E, num_speculations=d if strategy == "self_speculative" else None)
        layerskip_ext.generate(model, args.prompt, **dict(kwargs, max_new_tokens=4))  # warm up
        tps, stats = _median_run(model, args.prompt, args.repeats, **kwargs)
        rows.append((strategy, tps, 1e3 / tps if tps else float("nan"), stats.acceptance_rate))
    base = rows[0][1]
    print(f"{'strategy':<18}{'tokens/s':>10}{'ms/token':>10}{'speedup':>9}{'acceptance':>12}")
    for name, tps, ms, acc in rows:
        print(f"{name:<18}{tps:>10.1f}{ms:>10.1f}{_speedup(tps, base)}{'' if acc is None else f'{acc:.1%}':>12}")
    if tuned is not None:
        print(f"(early exit at layer {E}; self-speculative at the settings stored with the model: E={tuned.exit_layer} "
              f"d={tuned.num_speculations} threshold={tuned.draft_threshold} adaptive={tuned.adaptive} "
              f"K={tuned.draft_vocab_size or 'all'})")
    return 0


def cmd_sweep(args) -> int:
    """Self-speculative tokens/s (median of --repeats) and acceptance over a grid of exit layers and draft lengths."""
    import layerskip_ext
    _check_speed_run(args)
    model = _load(args)
    args.prompt = args.prompt if args.prompt is not None else _default_prompt(model)
    exits, ds = _int_list(args.exit_layers, "--exit-layers"), _int_list(args.num_speculations, "--num-speculations")
    common = dict(max_new_tokens=args.max_new_tokens, stop_token_ids=[], backend=args.backend)
    layerskip_ext.generate(model, args.prompt, **dict(common, max_new_tokens=4))  # warm up
    base, _ = _median_run(model, args.prompt, args.repeats, **common)
    print(f"autoregressive: {base:.1f} tokens/s (median of {args.repeats})")
    print(f"{'E':>4}{'d':>4}{'tokens/s':>10}{'speedup':>9}{'acceptance':>12}")
    for E in exits:
        for d in ds:
            tps, s = _median_run(model, args.prompt, args.repeats, strategy="self_speculative", exit_layer=E,
                                 num_speculations=d, **common)
            print(f"{E:>4}{d:>4}{tps:>10.1f}{_speedup(tps, base)}{s.acceptance_rate:>12.1%}")
    return 0


def _read_template(path):
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def cmd_chat(args) -> int:
    """Interactive chat in the model's template; replies stream as they are accepted."""
    import layerskip_ext
    from layerskip_ext.chat import chat_prompt_ids
    model = _load(args)
    template = _read_template(args.chat_template)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    chat_prompt_ids(model, [{"role": "user", "content": "hi"}], template)  # no template: fail before the prompt
    print("layerskip-ext chat: an empty line or Ctrl-D ends the chat", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        it = layerskip_ext.stream(model, chat_prompt_ids(model, messages, template), stop=args.stop,
                                  **_decode_kwargs(args, model))
        for piece in it:
            print(piece, end="", flush=True)
        print()
        s = it.result.stats
        if args.verbose:
            accept = "" if s.acceptance_rate is None else f", acceptance {s.acceptance_rate:.0%}"
            print(f"[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tokens/s{accept}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": it.result.text})
    return 0


def cmd_serve(args) -> int:
    """The OpenAI-compatible server (see layerskip_ext.server)."""
    from layerskip_ext.server import serve
    from layerskip_ext.server.app import ServerDefaults
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = _load(args)
    defaults = ServerDefaults(args.strategy, args.exit_layer, args.num_speculations)
    serve(model, host=args.host, port=args.port, log_level=args.log_level, model_name=args.model_name,
          max_batch=args.max_batch, max_queue=args.max_queue, defaults=defaults,
          chat_template=_read_template(args.chat_template))
    return 0
def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def cmd_tune(args) -> int:
    """Sweeps E x d x threshold x adaptive on sample prompts; writes tune.csv, tune.png and the settings file."""
    from layerskip_ext.tune import prompts_from_file, prompts_from_text, tune
    if args.prompts and args.text:
        raise ValueError("give --prompts or --text, not both")
    if args.model is None:
        raise ValueError("tune needs --model (the settings are stored beside it)")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    model = _load(args)
    if args.prompts:
        prompts = prompts_from_file(args.prompts)
    elif args.text:
        with open(args.text, encoding="utf-8") as f:
            prompts = prompts_from_text(model, f.read(), count=args.num_prompts)
    else:
        prompts = [_default_prompt(model)]
    L = model.num_layers
    exits = _int_list(args.exit_layers, "--exit-layers") if args.exit_layers else \
        sorted({max(1, min(L - 1, round(L * f))) for f in (0.125, 0.25, 0.375, 0.5)})
    try:
        thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.adaptive_modes]
    out = args.out or (args.model if os.path.isdir(args.model) else os.path.dirname(os.path.abspath(args.model)))
    tune(model, prompts[:args.num_prompts], out, exits, _int_list(args.num_speculations, "--num-speculations"),
         thresholds, modes, max_new_tokens=args.max_new_tokens, repeats=args.repeats, backend=args.backend,
         save=not args.no_save, draft_vocab_sizes=_int_list(args.draft_vocab_sizes, "--draft-vocab-sizes"))
    return 0


def cmd_draft_vocab(args) -> int:
    """Counts the tokens of the texts and stores them, most frequent first, beside the model."""
    from layerskip_ext.draft_vocab import count_tokens, save_draft_vocab
    if args.model is None:
        raise ValueError("draft-vocab needs --model (the counts are stored beside it)")
    model = _load(args)
    ids: list[int] = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            ids += model.encode(f.read())
    ranked = count_tokens(ids)
    path = save_draft_vocab(args.model, ranked, model.config.vocab_size, len(ids))
    print(f"{len(ids)} tokens counted, {len(ranked)} distinct of {model.config.vocab_size}; stored in {path}")
    for k in (256, 1024, 4096, 8192):
        if k < len(ranked):
            top = set(ranked[:k])
            covered = sum(1 for t in ids if t in top)
            print(f"  K={k}: {covered / len(ids):.1%} of the counted tokens")
    return 0


def cmd_train(argv) -> int:
    from layerskip_ext.training.cli import main as train_main
    return train_main(argv)


def _user_error(e: BaseException) -> int:
    """One line on stderr, exit status 2: what the command line shows for bad input instead of a traceback."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    print(f"layerskip-ext: error: {lines[0]}", file=sys.stderr)
    return 2


# bad arguments and files (every layerskip_ext error is a ValueError), unreadable paths, a missing optional
# package, and what the C++ ops report while running (RuntimeError, e.g. non-finite logits from a broken model)
USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except USER_ERRORS as e:
        return _user_error(e)
    except KeyboardInterrupt:
        print("layerskip-ext: interrupted", file=sys.stderr)
        return 130


def _main(argv) -> int:
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    parser = argparse.ArgumentParser(prog="layerskip-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text and print speed and acceptance")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--stream", action="store_true", help="print tokens as they are accepted")
    _model_args(g)
    _decode_args(g)
    c = sub.add_parser("chat", help="interactive chat in the model's chat template, streamed")
    _model_args(c)
    _decode_args(c)
    c.set_defaults(max_new_tokens=512)
    c.add_argument("--system", default=None, help="a system message to start the conversation")
    c.add_argument("--chat-template", default=None, help="a Jinja file to use instead of the model's template")
    c.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    c.add_argument("--verbose", action="store_true", help="print tokens/s and acceptance after each reply")
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--model-name", default=None, help="the name clients send as 'model' (default: the file's)")
    v.add_argument("--max-batch", type=int, default=8, help="rows decoded together")
    v.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; more get 429")
    v.add_argument("--strategy", default="autoregressive",
                   choices=["autoregressive", "early_exit", "self_speculative"],
                   help="for requests that do not set 'strategy'")
    v.add_argument("--exit-layer", type=int, default=None)
    v.add_argument("--num-speculations", type=int, default=None)
    v.add_argument("--chat-template", default=None, help="a Jinja file to use instead of the model's template")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    b = sub.add_parser("bench", help="tokens/s of each strategy")
    _model_args(b)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--exit-layer", type=int, default=None)
    b.add_argument("--num-speculations", type=int, default=None,
                   help="d (default: the model's tuned settings when neither E nor d is given, else 4)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--prompt", default=None, help="default: a request in the model's chat template")
    s = sub.add_parser("sweep", help="self-speculative grid over exit layers and draft lengths")
    _model_args(s)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--exit-layers", default="4,8,12,16")
    s.add_argument("--num-speculations", default="2,4,6")
    s.add_argument("--repeats", type=int, default=1, help="runs per point; tokens/s is their median")
    s.add_argument("--prompt", default=None, help="default: a request in the model's chat template")
    t = sub.add_parser("tune", help="sweep E, d, threshold; store the best settings with the model")
    _model_args(t)
    t.add_argument("--prompts", default=None, help="file with one prompt per line")
    t.add_argument("--text", default=None, help="text file cut into prompts")
    t.add_argument("--num-prompts", type=int, default=8, help="prompts used at most")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--exit-layers", default=None, help="comma-separated (default: 1/8, 1/4, 3/8, 1/2 of the depth)")
    t.add_argument("--num-speculations", default="2,4,6")
    t.add_argument("--thresholds", default="0,0.3")
    t.add_argument("--adaptive-modes", default="both", choices=["off", "on", "both"])
    t.add_argument("--draft-vocab-sizes", default="0",
                   help="comma-separated K of the reduced draft head (0: the whole head; needs `draft-vocab`)")
    t.add_argument("--repeats", type=int, default=1, help="runs per point; tokens/s is their median")
    t.add_argument("--out", default=None, help="folder for tune.csv and tune.png (default: the model's folder)")
    t.add_argument("--no-save", action="store_true", help="do not store the settings with the model")
    v = sub.add_parser("draft-vocab", help="count token frequencies on a text for the reduced draft head")
    _model_args(v)
    v.add_argument("--text", required=True, action="append", help="text file(s) to count on (training text)")
    sub.add_parser("train", help="LayerSkip training recipes (see layerskip-ext train --help)")
    args = parser.parse_args(argv)
    return {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "bench": cmd_bench, "sweep": cmd_sweep,
            "tune": cmd_tune, "draft-vocab": cmd_draft_vocab}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
