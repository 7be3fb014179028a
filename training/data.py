"""Token streams from local text files, seeded random windows, and prompt/response examples for fine-tuning.

A batch is a pure function of (seed, step, micro-step, rank), so a resumed run reads the same data and the DDP
ranks read disjoint samples of one global batch.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .early_exit_loss import IGNORE_INDEX


def _read(files: list[str]) -> str:
    parts = []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def tokenize_text(tokenizer, text: str, eos: int | None, chunk_lines: int = 2000) -> torch.Tensor:
    """text -> int32 [N] ids; documents (separated by a blank line run of 3+) are not marked, lines keep '\\n'."""
    lines = text.splitlines(keepends=True)
    ids = []
    for start in range(0, len(lines), chunk_lines):
        for enc in tokenizer.encode_batch(lines[start:start + chunk_lines], add_special_tokens=False):
            ids.extend(enc.ids)
    if eos is not None:
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def token_stream(tokenizer, files: list[str], eos: int | None, cache_dir: str | None = None) -> torch.Tensor:
    """Tokenized concatenation of `files` [N], cached in cache_dir keyed by the files' content and tokenizer."""
    text = _read(files)
    if cache_dir is None:
        return tokenize_text(tokenizer, text, eos)
    key = hashlib.sha1(text.encode() + tokenizer.to_str().encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokens-{key}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)  # a plain tensor: no pickled code runs
    ids = tokenize_text(tokenizer, text, eos)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: DDP ranks may tokenize the same files at once
    torch.save(ids, tmp)
    os.replace(tmp, path)
    return ids


class WindowSampler:
    """Random windows of seq_len + 1 tokens from a stream -> (input_ids [B, T], labels [B, T])."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"the data has {tokens.numel()} tokens: fewer than seq_len + 2 = {seq_len + 2}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def batch(self, step: int, micro: int, batch_size: int, rank: int = 0, world_size: int = 1):
        g = torch.Generator().manual_seed(hash((self.seed, step, micro)) & 0x7FFFFFFFFFFFFFFF)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (batch_size * world_size,), generator=g)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]  # [B] this rank's share
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None]  # [B, T + 1]
        w = self.tokens[idx].long()  # [B, T + 1]
        return w[:, :-1], w[:, 1:]


def valid_windows(tokens: torch.Tensor, seq_len: int, count: int):
    """Up to `count` consecutive, non-overlapping windows (input_ids [N, T], labels [N, T]) from the start."""
    n = min(count, (tokens.numel() - 1) // seq_len)
    if n < 1:
        raise ValueError(f"validation data has {tokens.numel()} tokens: fewer than seq_len + 1 = {seq_len + 1}")
    w = tokens[: n * seq_len + 1].long()
    return w[:-1].view(n, seq_len), w[1:].view(n, seq_len)


def read_examples(tokenizer, files: list[str], seq_len: int, eos: int | None):
    """JSONL {"prompt", "response"} -> (input_ids [N, T], labels [N, T]); loss on response tokens (and EOS) only."""
    pad = eos if eos is not None else 0
    inputs, labels = [], []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(ex, dict) or "prompt" not in ex or "response" not in ex:
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with 'prompt' and 'response'")
                if not isinstance(ex["prompt"], str) or not isinstance(ex["response"], str):
                    raise ValueError(f"{path}:{n}: 'prompt' and 'response' must be strings")
                p = tokenizer.encode(ex["prompt"], add_special_tokens=False).ids
                r = tokenizer.encode(ex["response"], add_special_tokens=False).ids + ([eos] if eos is not None else [])
                seq = (p + r)[: seq_len + 1]
                lab = ([IGNORE_INDEX] * len(p) + r)[: seq_len + 1]
                seq += [pad] * (seq_len + 1 - len(seq))
                lab += [IGNORE_INDEX] * (seq_len + 1 - len(lab))
                inputs.append(seq[:-1])
                labels.append(lab[1:])
    if not inputs:
        raise ValueError(f"no examples in {files}")
    return torch.tensor(inputs), torch.tensor(labels)


class ExampleSampler:
    """Random fine-tuning examples -> (input_ids [B, T], labels [B, T])."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, seed: int):
        self.inputs, self.labels, self.seed = inputs, labels, seed

    def batch(self, step: int, micro: int, batch_size: int, rank: int = 0, world_size: int = 1):
        g = torch.Generator().manual_seed(hash((self.seed, step, micro)) & 0x7FFFFFFFFFFFFFFF)
        idx = torch.randint(0, self.inputs.shape[0], (batch_size * world_size,), generator=g)
        idx = idx[rank * batch_size:(rank + 1) * batch_size]
        return self.inputs[idx], self.labels[idx]
