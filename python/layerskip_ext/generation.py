"""Generation API types and argument checks shared by every backend (reference and C++ engine)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import LayerSkipError
from .sampling import check_sampling_args
from .validation import as_float, as_int, check_token_ids, check_unicode

STRATEGIES = ("autoregressive", "early_exit", "self_speculative")
MAX_SPECULATIONS = 1024  # draft tokens per round at most (the engine's limit, csrc/engine/engine.cpp add_row)


@dataclass
class GenerationStats:
    strategy: str
    exit_layer: int | None
    num_speculations: int | None
    prompt_tokens: int = 0
    new_tokens: int = 0
    drafted: int = 0  # draft tokens proposed (self-speculative only)
    accepted: int = 0  # draft tokens the full model accepted
    rounds: int = 0  # draft/verify rounds
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted; None for strategies that do not draft."""
        if self.strategy != "self_speculative":
            return None
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding (prefill excluded; the first token comes from prefill)."""
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.decode_time_s if self.decode_time_s > 0 and decoded else 0.0

    @property
    def time_per_token(self) -> float:
        """Seconds per decoded token (prefill excluded)."""
        decoded = max(self.new_tokens - 1, 0)
        return self.decode_time_s / decoded if decoded else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second,
                 time_per_token=self.time_per_token)
        return d


@dataclass
class GenerationResult:
    tokens: list[int]  # new token ids (a stop token that ended generation is included)
    text: str  # the new tokens decoded, special tokens skipped
    stats: GenerationStats
    finish_reason: str = "length"  # "stop" | "length" (max_new_tokens) | "context" (context full)
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationArgs:
    """Validated generation arguments (see check_generation_args)."""
    prompt_ids: list[int]
    max_new_tokens: int
    strategy: str
    exit_layer: int
    num_speculations: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: tuple[int, ...]
    context_length: int
    # the self-speculative drafting policy (csrc/engine/draft_policy.h): stop a round's drafting below this
    # top probability (0: never); adapt the draft length and switch drafting off when it does not pay
    draft_threshold: float = 0.0
    adaptive: bool = False
    probe_interval: int = 32
    draft_vocab: tuple[int, ...] | None = None  # ascending token ids of a reduced draft head (None: whole head)


def _is_int(x) -> bool:
    return as_int(x) is not None  # Python, numpy or 0-d tensor integers; not bools


def check_generation_args(config, tokenizer, prompt, *, max_new_tokens, strategy, exit_layer, num_speculations,
                          temperature, top_k, top_p, seed, stop_token_ids, context_length, draft_threshold=0.0,
                          adaptive=False, probe_interval=32, draft_vocab=None) -> GenerationArgs:
    """Every generation argument checked once, with an error that names the problem."""
    L, V = config.num_layers, config.vocab_size
    if strategy not in STRATEGIES:
        raise LayerSkipError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(prompt, str):
        if prompt == "":
            raise LayerSkipError("prompt is empty")
        if tokenizer is None:
            raise LayerSkipError("prompt is a string but the model has no tokenizer: pass a list of token ids")
        prompt_ids = tokenizer.encode(check_unicode(prompt, "prompt")).ids
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:  # a tokenizer.json larger than the model's embedding (another model's tokenizer)
            raise LayerSkipError(f"prompt encodes to token id {bad[0]}, outside the model's vocabulary of {V} "
                                 "(is the tokenizer the model's?)")
    elif isinstance(prompt, (list, tuple)) or (hasattr(prompt, "tolist") and hasattr(prompt, "ndim")):
        prompt_ids = check_token_ids("prompt token ids", prompt, V)
    else:
        raise LayerSkipError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if len(prompt_ids) == 0:
        raise LayerSkipError("prompt is empty (it encodes to no tokens)")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise LayerSkipError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_int(context_length) or context_length < 1:
        raise LayerSkipError(f"context_length must be a positive integer, got {context_length!r}")
    max_new_tokens, context_length = min(as_int(max_new_tokens), context_length), as_int(context_length)
    if len(prompt_ids) >= context_length:
        raise LayerSkipError(f"prompt has {len(prompt_ids)} tokens, which does not leave room in the context of "
                         f"{context_length} tokens")
    if strategy == "autoregressive":
        exit_layer = L if exit_layer is None else exit_layer
        num_speculations = 1 if num_speculations is None else num_speculations
    if exit_layer is None:
        raise LayerSkipError(f"strategy {strategy!r} needs exit_layer")
    if not _is_int(exit_layer):
        raise LayerSkipError(f"exit_layer must be an integer, got {exit_layer!r}")
    upper = L - 1 if strategy == "self_speculative" else L
    if not 1 <= exit_layer <= upper:
        raise LayerSkipError(f"exit_layer must be in [1, {upper}] for strategy {strategy!r} on a model with {L} "
                         f"layers, got {exit_layer}")
    if num_speculations is None:
        num_speculations = 4 if strategy == "self_speculative" else 1
    if not _is_int(num_speculations) or not 1 <= num_speculations <= MAX_SPECULATIONS:
        raise LayerSkipError(f"num_speculations must be an integer in [1, {MAX_SPECULATIONS}], got "
                             f"{num_speculations!r}")
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    top_k = min(top_k, V)  # keeping V or more tokens keeps them all (and fits the engine's int64)
    if seed is None:
        seed = random.getrandbits(63)  # no seed: a fresh draw each call
    if not _is_int(seed):
        raise LayerSkipError(f"seed must be an integer or None, got {seed!r}")
    if stop_token_ids is None:
        stop_token_ids = tuple(config.eos_token_ids)
    else:
        if isinstance(stop_token_ids, (str, bytes, dict)) or not hasattr(stop_token_ids, "__iter__") or \
                getattr(stop_token_ids, "ndim", 1) != 1:
            raise LayerSkipError(f"stop_token_ids must be a list of token ids (None: the model's EOS ids; [] never "
                                 f"stops early), got {stop_token_ids!r}")
        stop_token_ids = tuple(check_token_ids("stop token ids", list(stop_token_ids), V))
    threshold = as_float(draft_threshold)
    if threshold is None or not 0.0 <= threshold <= 1.0:  # NaN fails the comparison
        raise LayerSkipError(f"draft_threshold must be a number in [0, 1], got {draft_threshold!r}")
    if not isinstance(adaptive, bool):
        raise LayerSkipError(f"adaptive must be True or False, got {adaptive!r}")
    if not _is_int(probe_interval) or not 1 <= as_int(probe_interval) <= 1 << 20:
        raise LayerSkipError(f"probe_interval must be an integer in [1, 2^20], got {probe_interval!r}")
    if draft_vocab is not None:
        draft_vocab = tuple(check_token_ids("draft_vocab", list(draft_vocab), V))
        if not draft_vocab or any(a >= b for a, b in zip(draft_vocab, draft_vocab[1:])):
            raise LayerSkipError(f"draft_vocab must be non-empty ascending token ids below {V}")
    return GenerationArgs(prompt_ids, max_new_tokens, strategy, as_int(exit_layer), as_int(num_speculations),
                          temperature, top_k, top_p, as_int(seed), stop_token_ids, context_length,
                          threshold, adaptive, as_int(probe_interval), draft_vocab)
