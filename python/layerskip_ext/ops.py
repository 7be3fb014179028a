"""Typed wrappers over torch.ops.layerskip.*, their fake (meta) kernels, and pure-PyTorch references.

The schemas and their meaning live in csrc/torch_bindings.cpp; the CPU kernels in csrc/cpu/. Every op
has a `<op>_reference` here, written with plain tensor operations, that the tests compare the kernels
against. The sampling references are layerskip_ext.sampling's functions (the one Python statement of those
semantics, also used by the reference decoder); they draw the same numbers as the kernels
(`uniform_from_counter`, the twin of csrc/random.h), so they match them token for token.

Shapes: T tokens in the step, H hidden size, Hq / Hkv query / key-value heads, D head_dim,
S cache capacity, V vocabulary, I MLP intermediate size, d draft length.
"""
from __future__ import annotations


import torch
from torch import Tensor

from layerskip_ext import sampling as _sampling
from layerskip_ext.sampling import seed_as_int64, uniform_from_counter  # uniform_from_counter: csrc/random.h
from layerskip_ext import _C  # noqa: F401  (loads the library: registers the ops and kernels)

_ops = torch.ops.layerskip

# ---------------------------------------------------------------------------------------------------
# Wrappers


def rms_norm(input: Tensor, weight: Tensor, eps: float) -> Tensor:
    """input [..., H] / rms(input) * weight [H] -> [..., H] (dtype of input; math in float32)."""
    return _ops.rms_norm.default(input, weight, eps)


def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual += input (in place, contiguous residual); returns rms_norm(residual, weight, eps)."""
    return _ops.fused_add_rms_norm.default(input, residual, weight, eps)


def rotary_embedding(query: Tensor, key: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place (rotate-half layout) at positions [T] int64.

    cos_sin_cache [max_pos, D]: row p holds cos(p * f_i) for the D/2 frequencies f_i, then sin(p * f_i)
    (see `rotary_cos_sin_cache`). query / key may be strided views with a dense last dimension.
    """
    _ops.rotary_embedding.default(query, key, positions, cos_sin_cache)


def kv_cache_write(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, slots: Tensor) -> None:
    """k_cache[:, slots[t]] = key[t], v_cache[:, slots[t]] = value[t], in place.

    caches [Hkv, S, D] contiguous; key, value [T, Hkv, D]; slots [T] int64 in [0, S). For duplicate
    slots the last token wins.
    """
    _ops.kv_cache_write.default(k_cache, v_cache, key, value, slots)


def attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float) -> Tensor:
    """Causal GQA attention of query [T, Hq, D] against caches [Hkv, S, D] -> [T, Hq, D].

    Query t sits at position start_pos + t and sees cache slots [0, start_pos + t].
    """
    return _ops.attention.default(query, k_cache, v_cache, start_pos, scale)


def silu_and_mul(input: Tensor) -> Tensor:
    """input [..., 2I] = gate | up -> silu(gate) * up [..., I]."""
    return _ops.silu_and_mul.default(input)


def linear(input: Tensor, weight: Tensor) -> Tensor:
    """input [T, K] float32 @ weight [N, K] (float32 or bfloat16).T -> [T, N] float32."""
    return _ops.linear.default(input, weight)


def sampling_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [T, V] -> probabilities [T, V] float32 after temperature, top-k and top-p (nucleus) filtering.

    temperature > 0. Tokens are ranked by logit, ties by lower index first; top_k > 0 keeps the first
    top_k; top_p < 1 then keeps the shortest prefix of that ranking whose mass reaches top_p of the
    top-k mass (at least one token); the kept probabilities are renormalised.
    """
    return _ops.sampling_probs.default(logits, temperature, top_k, top_p)


def sample_from_probs(probs: Tensor, seed: int, offset: int = 0) -> Tensor:
    """probs [T, V] float32 (rows >= 0, need not sum to 1) -> tokens [T] int64.

    Row t: u = uniform_from_counter(seed, offset + t); the first index whose float64 running sum
    exceeds u * sum(row).
    """
    return _ops.sample_from_probs.default(probs, seed_as_int64(seed), offset)


def sample(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0, offset: int = 0
) -> Tensor:
    """logits [T, V] -> tokens [T] int64: argmax (first maximum) when temperature == 0, else
    sample_from_probs(sampling_probs(logits, temperature, top_k, top_p), seed, offset)."""
    return _ops.sample.default(logits, temperature, top_k, top_p, seed_as_int64(seed), offset)


def speculative_accept_greedy(draft_tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """draft_tokens [d], target_logits [d+1, V] -> (tokens [d+1] int64, num_accepted [] int64).

    n = longest prefix with draft == argmax(target); tokens[:n] = draft[:n], tokens[n] = argmax of
    target row n, entries past n are -1.
    """
    return _ops.speculative_accept_greedy.default(draft_tokens, target_logits)


def speculative_accept(
    draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, seed: int, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Rejection sampling: draft_tokens [d], draft_probs [d, V], target_probs [d+1, V] (normalised rows)
    -> (tokens [d+1] int64, num_accepted [] int64), distributed as sampling from the target.

    Step i accepts draft[i] if u(2i) * draft_probs[i, x] < target_probs[i, x]; on rejection tokens[i] is
    drawn with u(2i+1) from max(0, target - draft) renormalised (from target when that is all zero);
    when all d are accepted tokens[d] is drawn with u(2d) from target_probs[d]. u(k) uses counter
    offset + k of seed. Entries past the last valid one are -1.
    """
    return _ops.speculative_accept.default(draft_tokens, draft_probs, target_probs, seed_as_int64(seed), offset)


def rotary_cos_sin_cache(inv_freq: Tensor, max_pos: int) -> Tensor:
    """inv_freq [D/2] -> cos_sin_cache [max_pos, D] float32: cos(p * inv_freq) then sin(p * inv_freq)."""
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq.double())  # [max_pos, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """The plain RoPE frequencies theta^(-2i/D), i < D/2, float32 (as HF Llama computes them)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


# ---------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), for torch.compile and opcheck


@torch.library.register_fake("layerskip::rms_norm")
def _rms_norm_fake(input, weight, eps):
    return input.new_empty(input.shape)


@torch.library.register_fake("layerskip::fused_add_rms_norm")
def _fused_add_rms_norm_fake(input, residual, weight, eps):
    return input.new_empty(input.shape)


@torch.library.register_fake("layerskip::rotary_embedding")
def _rotary_embedding_fake(query, key, positions, cos_sin_cache):
    return None


@torch.library.register_fake("layerskip::kv_cache_write")
def _kv_cache_write_fake(k_cache, v_cache, key, value, slots):
    return None


@torch.library.register_fake("layerskip::attention")
def _attention_fake(query, k_cache, v_cache, start_pos, scale):
    return query.new_empty(query.shape)


@torch.library.register_fake("layerskip::silu_and_mul")
def _silu_and_mul_fake(input):
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))


@torch.library.register_fake("layerskip::linear")
def _linear_fake(input, weight):
    return input.new_empty((input.shape[0], weight.shape[0]), dtype=input.dtype)  # float32 on the CPU


@torch.library.register_fake("layerskip::sampling_probs")
def _sampling_probs_fake(logits, temperature, top_k, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("layerskip::sample_from_probs")
def _sample_from_probs_fake(probs, seed, offset):
    return probs.new_empty((probs.shape[0],), dtype=torch.int64)


@torch.library.register_fake("layerskip::sample")
def _sample_fake(logits, temperature, top_k, top_p, seed, offset):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.register_fake("layerskip::speculative_accept_greedy")
def _speculative_accept_greedy_fake(draft_tokens, target_logits):
    d = draft_tokens.shape[0]
    return draft_tokens.new_empty((d + 1,), dtype=torch.int64), draft_tokens.new_empty((), dtype=torch.int64)


@torch.library.register_fake("layerskip::speculative_accept")
def _speculative_accept_fake(draft_tokens, draft_probs, target_probs, seed, offset):
    d = draft_tokens.shape[0]
    return draft_tokens.new_empty((d + 1,), dtype=torch.int64), draft_tokens.new_empty((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------
# References: plain PyTorch, float32 math, results cast to the input dtype. In-place ops return
# the updated tensors instead of mutating.


def rms_norm_reference(input: Tensor, weight: Tensor, eps: float) -> Tensor:
    x = input.float()  # [..., H]
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(input.dtype)


def fused_add_rms_norm_reference(input: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-> (rms_norm output, updated residual)."""
    new_residual = residual + input  # rounded to residual's dtype, as the kernel stores it
    return rms_norm_reference(new_residual, weight, eps), new_residual


def rotary_embedding_reference(
    query: Tensor, key: Tensor, positions: Tensor, cos_sin_cache: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (rotated query, rotated key)."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.float()[positions]  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, D/2]

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.float()[..., :half], x.float()[..., half:]  # [T, H, D/2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(query), rotate(key)


def kv_cache_write_reference(
    k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, slots: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (new k_cache, new v_cache); duplicate slots: the last token wins."""
    k_new, v_new = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        k_new[:, s] = key[t].to(k_cache.dtype)  # [Hkv, D]
        v_new[:, s] = value[t].to(v_cache.dtype)
    return k_new, v_new


def attention_reference(query: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float) -> Tensor:
    T, Hq, D = query.shape
    Hkv = k_cache.shape[0]
    n = start_pos + T
    k = k_cache[:, :n].float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, n, D]
    v = v_cache[:, :n].float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, n, D]
    q = query.float().transpose(0, 1)  # [Hq, T, D]
    scores = (q @ k.transpose(1, 2)) * scale  # [Hq, T, n]
    visible = torch.arange(n)[None, :] <= (start_pos + torch.arange(T))[:, None]  # [T, n]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [Hq, T, D]
    return out.transpose(0, 1).to(query.dtype)  # [T, Hq, D]


def silu_and_mul_reference(input: Tensor) -> Tensor:
    gate, up = input.float().chunk(2, dim=-1)  # [..., I] each
    return (torch.nn.functional.silu(gate) * up).to(input.dtype)


def linear_reference(input: Tensor, weight: Tensor) -> Tensor:
    return input.float() @ weight.float().T  # [T, N]


# The sampling semantics have one Python statement, layerskip_ext.sampling (also the reference decoder's);
# these names are the per-op oracles the kernel tests call.


def sampling_probs_reference(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    return _sampling.sampling_probs(logits, temperature, top_k, top_p)


def sample_from_probs_reference(probs: Tensor, seed: int, offset: int = 0) -> Tensor:
    return _sampling.sample_from_probs(probs, seed, offset)


def sample_reference(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0, offset: int = 0
) -> Tensor:
    return _sampling.sample(logits, temperature, top_k, top_p, seed, offset)


def speculative_accept_greedy_reference(draft_tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    tokens, n = _sampling.speculative_accept_greedy(draft_tokens, target_logits)
    return tokens, torch.tensor(n, dtype=torch.int64)


def speculative_accept_reference(
    draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, seed: int, offset: int = 0
) -> tuple[Tensor, Tensor]:
    tokens, n = _sampling.speculative_accept(draft_tokens, draft_probs, target_probs, seed, offset)
    return tokens, torch.tensor(n, dtype=torch.int64)


__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "kv_cache_write",
    "attention",
    "silu_and_mul",
    "linear",
    "sampling_probs",
    "sample_from_probs",
    "sample",
    "speculative_accept_greedy",
    "speculative_accept",
    "rotary_cos_sin_cache",
    "rope_inv_freq",
    "uniform_from_counter",
]
