"""The reduced draft head's vocabulary: token ids by frequency, counted on text, stored with the model.

Self-speculative drafting may use only the K most frequent tokens' rows of the shared LM head (a draft step
then reads K x H instead of V x H of head weight); verification always uses the whole head, so the output
stays the full model's (for sampling, the draft distribution is zero outside the K tokens and rejection
sampling stays exact). The file `layerskip_draft_vocab.json` lives beside config.json (for `m.gguf`:
`m.gguf.layerskip_draft_vocab.json`):

    {"format": "layerskip_draft_vocab", "version": 1, "vocab_size": 49152, "tokens_counted": 123456,
     "token_ids": [13, 28, ...]}        # every token seen, most frequent first (ties: lower id first)
"""
from __future__ import annotations

import collections
import json
import os

from .errors import CheckpointError, LayerSkipError
from .settings import read_sidecar_json

FILE_NAME = "layerskip_draft_vocab.json"
FORMAT, VERSION = "layerskip_draft_vocab", 1


def draft_vocab_path(model_path: str) -> str:
    if os.path.isdir(model_path):
        return os.path.join(model_path, FILE_NAME)
    return model_path + "." + FILE_NAME


def count_tokens(token_ids: list[int]) -> list[int]:
    """Every distinct token of `token_ids`, most frequent first, ties by lower id."""
    counts = collections.Counter(token_ids)
    return sorted(counts, key=lambda t: (-counts[t], t))


def save_draft_vocab(model_path: str, ranked: list[int], vocab_size: int, tokens_counted: int) -> str:
    path = draft_vocab_path(model_path)
    raw = dict(format=FORMAT, version=VERSION, vocab_size=vocab_size, tokens_counted=tokens_counted,
               token_ids=list(ranked))
    check_draft_vocab(raw, vocab_size, path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(raw, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def check_draft_vocab(raw, vocab_size: int, path: str) -> list[int]:
    """The ranked token ids in a parsed file, checked against a vocabulary of `vocab_size`."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}", path=path)
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: field 'format'/'version' must be {FORMAT!r} / {VERSION}", path=path,
                              field="format")
    if raw.get("vocab_size") != vocab_size:
        raise CheckpointError(f"{path}: field 'vocab_size' is {raw.get('vocab_size')!r}, but the model's vocabulary "
                              f"has {vocab_size} tokens", path=path, field="vocab_size")
    ids = raw.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise CheckpointError(f"{path}: field 'token_ids' must be a non-empty list", path=path, field="token_ids")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise CheckpointError(f"{path}: field 'token_ids' holds {t!r}, not a token id below {vocab_size}",
                                  path=path, field="token_ids")
    if len(set(ids)) != len(ids):
        raise CheckpointError(f"{path}: field 'token_ids' repeats a token id", path=path, field="token_ids")
    return ids


def load_draft_vocab(model_path: str | None, vocab_size: int) -> list[int] | None:
    """The model's ranked draft vocabulary, None when it has none; CheckpointError naming the file when corrupt."""
    if model_path is None:
        return None
    path = draft_vocab_path(model_path)
    raw = read_sidecar_json(path)
    return None if raw is None else check_draft_vocab(raw, vocab_size, path)


def select(ranked: list[int] | None, k: int, path_hint: str = "the model") -> tuple[int, ...]:
    """The K most frequent token ids, ascending (the reduced head's rows in vocabulary order)."""
    if ranked is None:
        raise LayerSkipError(f"draft_vocab_size={k} needs a draft vocabulary stored with {path_hint}: run "
                         "`layerskip-ext draft-vocab --model M --text FILE`")
    if not 1 <= k <= len(ranked):
        raise LayerSkipError(f"draft_vocab_size must be in [1, {len(ranked)}] (the tokens counted), got {k}")
    return tuple(sorted(ranked[:k]))
