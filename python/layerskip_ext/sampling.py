"""Pure-PyTorch sampling and speculative acceptance: the semantics the C++ ops implement.

Random draws are `uniform_from_counter(seed, counter)` (csrc/random.h): a pure function, so a seeded
generation gives the same tokens in the reference and in the engine.
"""
from __future__ import annotations

import torch

from .errors import LayerSkipError
from .validation import as_float, as_int

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def uniform_from_counter(seed: int, counter: int) -> float:
    """splitmix64 of seed ^ (counter * golden); the top 53 bits as a float in [0, 1)."""
    z = (seed & _MASK64) ^ ((counter * _GOLDEN) & _MASK64)
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


def seed_as_int64(seed: int) -> int:
    """Any Python int seed as the int64 with the same low 64 bits (ops take int64, C++ reads them as uint64)."""
    seed &= _MASK64
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below, 1/T overflows float32 scaling of the
# logits (NaN probabilities); above, the distribution is uniform to float32 precision anyway.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4


def check_sampling_args(temperature, top_k, top_p) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) as (float, int, float), or LayerSkipError naming the bad one.

    Accepts numpy / 0-d tensor scalars; refuses bools (top_k=True is not top_k=1) and strings."""
    t = as_float(temperature)
    if t is None or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise LayerSkipError(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                             f"{MAX_TEMPERATURE:g}], got {temperature!r}")
    k = as_int(top_k)
    if k is None or k < 0:
        raise LayerSkipError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    p = as_float(top_p)
    if p is None or not (0.0 < p <= 1.0):
        raise LayerSkipError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return t, k, p


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [T, V] -> float32 probabilities [T, V] after temperature, top-k then top-p, renormalised.

    Ties at the top-k / top-p boundary are broken by the lower token id (a stable sort)."""
    if temperature <= 0:
        raise LayerSkipError("sampling_probs needs temperature > 0 (temperature 0 is greedy decoding)")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [T, V]
    V = probs.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [T, V]
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < top_k < V:
        keep[:, top_k:] = False
    if top_p < 1.0:
        kept = sorted_probs * keep
        mass_before = torch.cumsum(kept.double(), dim=-1) - kept.double()  # mass of the higher-ranked tokens
        keep &= mass_before < top_p * kept.double().sum(-1, keepdim=True)
    mask = torch.zeros_like(keep).scatter(-1, order, keep)  # back to vocabulary order
    probs = probs * mask
    return probs / probs.sum(-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """probs [T, V] -> [T] int64: row t inverts its CDF at uniform_from_counter(seed, offset + t)."""
    out = []
    for t in range(probs.shape[0]):
        row = probs[t].double()
        cdf = torch.cumsum(row, 0)
        u = uniform_from_counter(seed, offset + t) * cdf[-1].item()
        idx = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True).item())
        if idx >= row.shape[0] or row[idx] <= 0:  # rounding at the top end: last positive entry
            idx = int(torch.nonzero(row > 0).max().item())
        out.append(idx)
    return torch.tensor(out, dtype=torch.int64)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, offset: int) -> torch.Tensor:
    """logits [T, V] -> [T] int64: argmax when temperature == 0, else a seeded draw."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample_from_probs(sampling_probs(logits, temperature, top_k, top_p), seed, offset)


def speculative_accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor):
    """draft [d], target_logits [d+1, V] -> (tokens [d+1] with -1 past the end, num_accepted)."""
    d = draft_tokens.shape[0]
    target = target_logits.argmax(-1)  # [d+1]
    n = 0
    while n < d and int(draft_tokens[n]) == int(target[n]):
        n += 1
    tokens = torch.full((d + 1,), -1, dtype=torch.int64)
    tokens[:n] = draft_tokens[:n]
    tokens[n] = target[n]
    return tokens, n


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       seed: int, offset: int):
    """Rejection sampling. draft [d], draft_probs [d, V], target_probs [d+1, V] -> (tokens [d+1], num_accepted).

    Step i accepts x = draft[i] if u(2i) * p_draft(x) < p_target(x); on rejection the token is drawn with
    u(2i + 1) from max(0, p_target - p_draft) renormalised (p_target if that is all zero); if all d are
    accepted a bonus token is drawn with u(2d) from target_probs[d]."""
    d = draft_tokens.shape[0]
    tokens = torch.full((d + 1,), -1, dtype=torch.int64)
    for i in range(d):
        x = int(draft_tokens[i])
        p_t, p_d = float(target_probs[i, x]), float(draft_probs[i, x])
        if uniform_from_counter(seed, offset + 2 * i) * p_d < p_t:
            tokens[i] = x
            continue
        residual = (target_probs[i].double() - draft_probs[i].double()).clamp_min(0)
        if residual.sum() <= 0:
            residual = target_probs[i].double()
        tokens[i] = sample_from_probs(residual[None], seed, offset + 2 * i + 1)[0]
        return tokens, i
    tokens[d] = sample_from_probs(target_probs[d:d + 1], seed, offset + 2 * d)[0]
    return tokens, d
