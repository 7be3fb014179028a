"""`generate()`: one entry point for every strategy and backend, for one prompt or a batch of prompts."""
from __future__ import annotations

import torch

from . import engine as _engine
from .errors import LayerSkipError
from .draft_vocab import select as select_draft_vocab
from .generation import GenerationResult, check_generation_args
from .model import LayerSkipModel
from .reference_generate import generate_reference_batch
from .stopping import stop_strings_hook
from .validation import as_int

BACKENDS = ("auto", "engine", "reference")

# Arguments that may be given per row in batched mode (a list with one value per prompt).
PER_ROW = ("max_new_tokens", "strategy", "exit_layer", "num_speculations", "temperature", "top_k", "top_p", "seed",
           "stop_token_ids", "context_length", "draft_threshold", "adaptive", "probe_interval", "draft_vocab_size")


def _is_prompt_list(prompt) -> bool:
    """True for a batch: a list / tuple whose elements are prompts (not token ids)."""
    if not isinstance(prompt, (list, tuple)):
        return False
    if len(prompt) == 0:
        return True  # rejected below as an empty batch
    first = prompt[0]
    return isinstance(first, (str, list, tuple)) or hasattr(first, "ndim") and getattr(first, "ndim", 0) >= 1


def _row_value(name: str, value, row: int, rows: int):
    """The value of argument `name` for one row: a per-row list, or the same value for every row."""
    per_row = isinstance(value, (list, tuple)) and name != "stop_token_ids"
    if name == "stop_token_ids":  # per row: a list of lists (or None)
        per_row = isinstance(value, (list, tuple)) and len(value) > 0 and all(
            v is None or isinstance(v, (list, tuple)) for v in value)
    if not per_row:
        return value
    if len(value) != rows:
        raise LayerSkipError(f"{name} has {len(value)} values for {rows} prompts (give one value, or one per prompt)")
    return value[row]


def _apply_settings(model: LayerSkipModel, row: dict) -> None:
    """Fills a self-speculative row's unset exit_layer / num_speculations (and then draft_threshold / adaptive)
    from the model's stored settings; the policy defaults (threshold 0, not adaptive) otherwise."""
    stored = model.settings
    if row["strategy"] == "self_speculative" and stored is not None and row["exit_layer"] is None \
            and row["num_speculations"] is None:
        row["exit_layer"], row["num_speculations"] = stored.exit_layer, stored.num_speculations
        if row["draft_threshold"] is None:
            row["draft_threshold"] = stored.draft_threshold
        if row["adaptive"] is None:
            row["adaptive"] = stored.adaptive
        if row["draft_vocab_size"] is None:
            row["draft_vocab_size"] = stored.draft_vocab_size
    k = row.pop("draft_vocab_size")
    row["draft_vocab"] = None
    if k is not None:  # checked for every strategy (as draft_threshold and adaptive are); False, 0.0, "" are refused
        if as_int(k) is None or as_int(k) < 0:
            raise LayerSkipError(f"draft_vocab_size must be an integer >= 0 (0 or None: the whole head), got {k!r}")
        if as_int(k) > 0 and row["strategy"] == "self_speculative":
            row["draft_vocab"] = select_draft_vocab(model.draft_vocab, as_int(k), model.path or "the model")
    if row["draft_threshold"] is None:
        row["draft_threshold"] = 0.0
    if row["adaptive"] is None:
        row["adaptive"] = False


def _takes_args(fn, n: int) -> bool:
    """Whether fn can be called with n positional arguments (True when its signature cannot be read)."""
    import inspect
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # a builtin without a readable signature
        return True
    return True


def generate(model: LayerSkipModel, prompt, max_new_tokens=64, strategy="autoregressive", exit_layer=None,
             num_speculations=None, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop_token_ids=None,
             on_token=None, backend: str = "auto", context_length=None,
             weight_dtype: torch.dtype | str | None = None, stop=None, draft_threshold=None, adaptive=None,
             probe_interval=32, draft_vocab_size=None):
    """Generates up to `max_new_tokens` tokens after `prompt`.

    prompt: a string or a list of token ids -> one GenerationResult; or a list of such prompts (lengths may
    differ) -> a list of GenerationResult, one per prompt, decoded together in batched steps. Row i of a batch
    yields exactly the tokens of a call with prompt i alone (greedy and seeded sampling, every strategy).
    In batched mode every argument below may also be a list with one value per prompt (stop_token_ids: a list
    of lists); a single value applies to every row (the same seed for every row gives each row the draws of a
    call alone with that seed).
    strategy: "autoregressive" (all layers), "early_exit" (layers [0, exit_layer) then the LM head) or
    "self_speculative" (layers [0, exit_layer) draft `num_speculations` tokens, the rest verify; the output
    is the full model's: identical tokens when greedy, the same distribution when sampling).
    temperature 0 is greedy; otherwise top_k (0 = off) and top_p filter, and `seed` fixes the draws.
    stop_token_ids: None stops at the model's EOS ids, [] never stops early.
    on_token: called with each new token id as soon as it is accepted; in batched mode with (row, token).
    Returning True ends that generation (row) there.
    stop: a string or list of strings (for every row): a generation ends when its text contains one, and its
    text excludes it.
    draft_threshold, adaptive, probe_interval (self-speculative; csrc/engine/draft_policy.h states the policy):
    a round stops drafting when the draft's top probability falls below draft_threshold (0: never); adaptive
    adapts the draft length (at most num_speculations) to the acceptance observed and switches drafting off
    when it does not pay (plain decoding, probed again every probe_interval tokens). Output stays the full
    model's. Self-speculative calls that give neither exit_layer nor num_speculations use the settings stored
    with the model (`layerskip-ext tune`, model.settings) for those two and, when not given, draft_threshold and
    adaptive; without stored settings draft_threshold defaults to 0 and adaptive to False.
    draft_vocab_size K (self-speculative): drafts use only the LM-head rows of the K most frequent tokens of
    the draft vocabulary stored with the model (`layerskip-ext draft-vocab`); verification uses the whole head,
    so the output is unchanged. None: the stored settings' K, else 0 (the whole head).
    backend: "engine" (C++ decoder loop), "reference" (pure PyTorch oracle) or "auto" (engine when built).
    weight_dtype: the engine's matmul weights, torch.float32, torch.bfloat16 or "packed" (the model's GGUF blocks
    as loaded; None: "packed" for a model with packed weights, else bfloat16 for a bfloat16 model or one loaded
    with weights="bf16", else float32). The reference always runs the model's module (packed weights dequantized).
    Concurrency: calls on one model from several threads are serialized (each gets correct results); a call
    from inside on_token on the same model raises RuntimeError.
    """
    if not isinstance(model, LayerSkipModel):
        raise TypeError(f"model must be a LayerSkipModel from layerskip_ext.load(), got {type(model).__name__}")
    if backend not in BACKENDS:
        raise LayerSkipError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if on_token is not None and not callable(on_token):
        raise TypeError("on_token must be callable")
    if weight_dtype is not None:
        _engine.check_weight_dtype(model, weight_dtype)
    batched = _is_prompt_list(prompt)
    if on_token is not None and not _takes_args(on_token, 2 if batched else 1):
        raise TypeError("on_token must take (row, token) for a batch of prompts" if batched else
                        "on_token must take one argument, the token id (a batch of prompts passes (row, token))")
    prompts = list(prompt) if batched else [prompt]
    if batched and len(prompts) == 0:
        raise LayerSkipError("prompt is empty: an empty list is neither a prompt nor a batch of prompts")
    values = dict(max_new_tokens=max_new_tokens, strategy=strategy, exit_layer=exit_layer,
                  num_speculations=num_speculations, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop_token_ids=stop_token_ids, context_length=context_length, draft_threshold=draft_threshold,
                  adaptive=adaptive, probe_interval=probe_interval, draft_vocab_size=draft_vocab_size)
    args_list = []
    for i, p in enumerate(prompts):
        row = {k: (_row_value(k, v, i, len(prompts)) if batched else v) for k, v in values.items()}
        try:
            if batched and not isinstance(p, (str, list, tuple)) and not hasattr(p, "ndim"):
                raise LayerSkipError(f"a prompt must be a string or a list of token ids, got {type(p).__name__} "
                                 "(a batch must not mix prompts with token ids)")
            _apply_settings(model, row)
            if row["context_length"] is None:
                row["context_length"] = model.config.max_position_embeddings
            elif (as_int(row["context_length"]) or 0) > model.config.max_position_embeddings:
                raise LayerSkipError(f"context_length {row['context_length']} exceeds the model's max_position_embeddings "
                                 f"({model.config.max_position_embeddings})")
            args_list.append(check_generation_args(model.config, model.tokenizer, p, **row))
        except ValueError as e:
            if not batched:
                raise
            raise LayerSkipError(f"prompts[{i}]: {e}") from None
    if not batched and on_token is not None:
        single_callback = on_token
        on_token = lambda row, token: single_callback(token)  # noqa: E731
    streams = None
    if stop is not None:
        on_token, streams = stop_strings_hook(model, stop, on_token, len(args_list))
    if backend == "reference" or (backend == "auto" and not _engine.is_available()):
        results = generate_reference_batch(model.module, args_list, decode=model.decode, on_token=on_token)
    else:
        results = _engine.get_engine(model, weight_dtype).generate_batch(args_list, on_token=on_token)
    for result, text_stream in zip(results, streams or ()):
        if text_stream.stopped:
            result.text = text_stream.text
    return results if batched else results[0]
