"""Typed wrappers over torch.ops.layerskip.*, their fake (meta) kernels, and pure-PyTorch references.

The schemas and their meaning live in csrc/torch_bindings.cpp; the CPU kernels in csrc/cpu/. Every op
has a `<op>_reference` here, written with plain tensor operations, that the tests compare the kernels
against. The sampling references are layerskip_ext.sampling's functions (the one Python statement of those
semantics, also used by the reference decoder); they draw the same numbers as the kernels
(`uniform_from_counter`, the twin of csrc/random.h), so they match them token for token.

Shapes: T tokens in the step (from any rows), B cache rows, H hidden size, Hq / Hkv query / key-value heads,
D head_dim, S cache positions per row, V vocabulary, I MLP intermediate size, d draft length.
"""
from __future__ import annotations


import torch
from torch import Tensor

from layerskip_ext import sampling as _sampling
from layerskip_ext.reference import cos_sin_table
from layerskip_ext.sampling import seed_as_int64, uniform_from_counter  # uniform_from_counter: csrc/random.h
from layerskip_ext import _C  # noqa: F401  (loads the library: registers the ops and kernels)

_ops = torch.ops.layerskip

# ---------------------------------------------------------------------------------------------------
# Wrappers: each allocates the op's outputs, calls it, and returns them. Sampling parameters may be Python
# scalars (the same for every token) or per-token tensors / lists; seed and offset scalars give token t the
# draw `offset + t` of `seed`, as the engine's per-token counters do.


def _per_token(value, n: int, dtype: torch.dtype, device) -> Tensor:
    """A scalar or a sequence as a [n] tensor of `dtype` (a tensor is passed through)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=dtype, device=device)
    return torch.full((n,), value, dtype=dtype, device=device)


def _seeds_counters(seed, offset, n: int, device) -> tuple[Tensor, Tensor]:
    seeds = seed if isinstance(seed, Tensor) else torch.full((n,), seed_as_int64(seed), dtype=torch.int64,
                                                             device=device)
    if isinstance(offset, Tensor):
        counters = offset
    else:
        counters = offset + torch.arange(n, dtype=torch.int64, device=device)
    return seeds, counters


def _filter_params(logits: Tensor, temperature, top_k, top_p) -> tuple[Tensor, Tensor, Tensor]:
    n, device = logits.shape[0] if logits.dim() == 2 else 0, logits.device
    return (_per_token(temperature, n, torch.float64, device), _per_token(top_k, n, torch.int64, device),
            _per_token(top_p, n, torch.float64, device))


def rms_norm(input: Tensor, weight: Tensor, eps: float) -> Tensor:
    """input [..., H] / rms(input) * weight [H] -> [..., H] (dtype of input; math in float32)."""
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    _ops.rms_norm.default(out, input, weight, eps)
    return out


def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual += input (in place, contiguous residual); returns rms_norm(residual, weight, eps)."""
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    _ops.fused_add_rms_norm.default(out, input, residual, weight, eps)
    return out


def rotary_embedding(query: Tensor, key: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place (rotate-half layout) at positions [T] int64.

    cos_sin_cache [max_pos, D]: row p holds cos(p * f_i) for the D/2 frequencies f_i, then sin(p * f_i)
    (see `rotary_cos_sin_cache`). query / key may be strided views with a dense last dimension.
    """
    _ops.rotary_embedding.default(query, key, positions, cos_sin_cache)


def kv_cache_write(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, rows: Tensor,
                   positions: Tensor) -> None:
    """k_cache[rows[t], :, positions[t]] = key[t], likewise v, in place.

    caches [B, Hkv, S, D] contiguous; key, value [T, Hkv, D]; rows [T] int64 in [0, B); positions [T] int64 in
    [0, S). For duplicate (row, position) pairs the last token wins.
    """
    _ops.kv_cache_write.default(k_cache, v_cache, key, value, rows, positions)


def attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, positions: Tensor,
              scale: float) -> Tensor:
    """Causal GQA attention of query [T, Hq, D] against caches [B, Hkv, S, D] -> [T, Hq, D].

    Token t attends to slots [0, positions[t]] of cache row rows[t].
    """
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _ops.attention.default(out, query, k_cache, v_cache, rows, positions, scale)
    return out


def silu_and_mul(input: Tensor) -> Tensor:
    """input [..., 2I] = gate | up -> silu(gate) * up [..., I]."""
    out = input.new_empty((*input.shape[:-1], input.shape[-1] // 2)) if input.dim() else input.new_empty(())
    _ops.silu_and_mul.default(out, input)
    return out


def linear(input: Tensor, weight: Tensor) -> Tensor:
    """input [T, K] float32 @ weight [N, K] (float32, bfloat16 or float16).T -> [T, N] float32. With bfloat16
    weights on a CPU with AVX512_BF16 the input is rounded to bfloat16 first (linear_rounds_bf16_inputs())."""
    rows = input.shape[0] if input.dim() == 2 else 0
    cols = weight.shape[0] if weight.dim() == 2 else 0
    # float32 on the CPU; the CUDA kernel also takes float16 / bfloat16 inputs and writes their dtype
    dtype = input.dtype if input.is_cuda and input.dtype in (torch.float16, torch.bfloat16) else torch.float32
    out = torch.empty((rows, cols), dtype=dtype, device=input.device)
    _ops.linear.default(out, input, weight)
    return out


def linear_quantized(input: Tensor, packed: Tensor, format: int, out_features: int, in_features: int,
                     out: Tensor | None = None) -> Tensor:
    """input [T, K] float32 @ dequantized(packed).T -> [T, N] float32 (into `out` when given).

    packed: [N, K / 32 * block bytes] uint8 GGUF blocks; format: GGUF type number (2 Q4_0, 3 Q4_1, 8 Q8_0).
    Input rows are quantized per block of 32 to int8 (scale max|x| / 127) before the integer dot products.
    """
    if out is None:
        return _ops.linear_quantized.default(input, packed, format, out_features, in_features)
    return _ops.linear_quantized.out(input, packed, format, out_features, in_features, out=out)


def dequantize_rows(packed: Tensor, format: int, out_features: int, in_features: int, ids: Tensor) -> Tensor:
    """Rows `ids` [T] int64 of the packed [N, K] matrix, dequantized -> [T, K] float32."""
    return _ops.dequantize_rows.default(packed, format, out_features, in_features, ids)


INTERLEAVED = 1000  # format INTERLEAVED + f: GGUF format f's blocks interleaved by 16 rows (interleave_quantized)


def interleave_quantized(packed: Tensor, format: int, out_features: int, in_features: int) -> Tensor:
    """The packed [N, K] GGUF blocks interleaved by groups of 16 rows (1-D uint8; csrc/cpu/quant_interleave.h):
    the layout of format INTERLEAVED + format, which linear_quantized and dequantize_rows take too."""
    return _ops.interleave_quantized.default(packed, format, out_features, in_features)


def quant_kernels() -> list[str]:
    """The linear_quantized kernels this CPU can run, best first (of avx512vnni, avx512, avx2, plain)."""
    return list(_ops.quant_kernels.default())


def quant_kernel() -> str:
    """The linear_quantized kernel in use."""
    return _ops.quant_kernel.default()


def set_quant_kernel(name: str) -> None:
    """Forces a linear_quantized kernel ("auto": the best this CPU supports)."""
    _ops.set_quant_kernel.default(name)


def attention_kernels() -> list[str]:
    """The CPU kernels of `attention` this CPU can run, best first (of avx512, avx2, plain)."""
    return list(_ops.attention_kernels.default())


def attention_kernel() -> str:
    """The CPU `attention` kernel in use."""
    return _ops.attention_kernel.default()


def set_attention_kernel(name: str) -> None:
    """Forces a CPU `attention` kernel ("auto": the best this CPU supports)."""
    _ops.set_attention_kernel.default(name)


def work_pool_enabled() -> bool:
    """Whether the CPU ops' parallel loops run on the work-claiming pool (csrc/cpu/work_pool.h; the default) or on
    ATen's OpenMP team (LAYERSKIP_WORK_POOL=0, read once by the extension)."""
    return bool(_ops.work_pool_enabled.default())


def linear_kernels() -> list[str]:
    """The kernels of `linear` (T <= 64 rows) this CPU can run, best first (of avx512bf16, avx512, avx2, plain)."""
    return list(_ops.linear_kernels.default())


def linear_kernel() -> str:
    """The `linear` kernel in use."""
    return _ops.linear_kernel.default()


def linear_rounds_bf16_inputs() -> bool:
    """Whether `linear` with bfloat16 weights rounds its input rows to bfloat16 (the avx512bf16 kernel, at every
    T): then it computes bf16(input) @ weight.T with float32 sums; otherwise input @ weight.T in float32."""
    return linear_kernel() == "avx512bf16"


def set_linear_kernel(name: str) -> None:
    """Forces a `linear` kernel ("auto": the best this CPU supports). Results differ in the low bits between
    kernels: switch between generations, not during one."""
    _ops.set_linear_kernel.default(name)


def quant_activations() -> str:
    """How linear_quantized rounds its input rows: "int8x2" (two levels, the default) or "int8" (as llama.cpp)."""
    return _ops.quant_activations.default()


def set_quant_activations(name: str) -> None:
    """Sets the activation rounding of linear_quantized: "int8x2" or "int8"."""
    _ops.set_quant_activations.default(name)


def sampling_probs(logits: Tensor, temperature, top_k=0, top_p=1.0) -> Tensor:
    """logits [T, V] -> probabilities [T, V] float32 after temperature, top-k and top-p (nucleus) filtering.

    Parameters are scalars or per-token [T] tensors. temperature 0 gives the one-hot of the first argmax.
    Tokens are ranked by logit, ties by lower index first; top_k > 0 keeps the first top_k; top_p < 1 then
    keeps the shortest prefix of that ranking whose mass reaches top_p of the top-k mass (at least one
    token); the kept probabilities are renormalised.
    """
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _ops.sampling_probs.default(out, logits, *_filter_params(logits, temperature, top_k, top_p))
    return out


def sample_from_probs(probs: Tensor, seed, offset=0) -> Tensor:
    """probs [T, V] float32 (rows >= 0, need not sum to 1) -> tokens [T] int64.

    Row t: u = uniform_from_counter(seed, offset + t) (or the per-token seeds / counters when tensors are
    given); the first index whose float64 running sum exceeds u * sum(row).
    """
    n = probs.shape[0] if probs.dim() >= 1 else 0
    out = torch.empty((n,), dtype=torch.int64, device=probs.device)
    _ops.sample_from_probs.default(out, probs, *_seeds_counters(seed, offset, n, probs.device))
    return out


def sample(logits: Tensor, temperature, top_k=0, top_p=1.0, seed=0, offset=0) -> Tensor:
    """logits [T, V] -> tokens [T] int64: argmax (first maximum) where temperature == 0, else
    sample_from_probs(sampling_probs(logits, temperature, top_k, top_p), seed, offset)."""
    n = logits.shape[0] if logits.dim() >= 1 else 0
    out = torch.empty((n,), dtype=torch.int64, device=logits.device)
    _ops.sample.default(out, logits, *_filter_params(logits, temperature, top_k, top_p),
                        *_seeds_counters(seed, offset, n, logits.device))
    return out


def _batched(draft_tokens: Tensor, draft_lengths):
    """(draft_tokens [B, d], draft_lengths [B], single): a 1-D draft is a batch of one."""
    single = draft_tokens.dim() == 1
    drafts = draft_tokens[None] if single else draft_tokens
    if draft_lengths is None and drafts.dim() == 2:
        draft_lengths = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.int64, device=drafts.device)
    return drafts, draft_lengths, single


def _accept_outputs(drafts: Tensor) -> tuple[Tensor, Tensor]:
    B, d = (drafts.shape[0], drafts.shape[1]) if drafts.dim() == 2 else (0, 0)
    return (torch.empty((B, d + 1), dtype=torch.int64, device=drafts.device),
            torch.empty((B,), dtype=torch.int64, device=drafts.device))


def speculative_accept_greedy(draft_tokens: Tensor, target_logits: Tensor,
                              draft_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """draft_tokens [B, d], target_logits [B, d+1, V] -> (tokens [B, d+1] int64, num_accepted [B] int64).

    Row b uses its first draft_lengths[b] drafts (default: all d). n = longest prefix with draft == argmax(target);
    tokens[:n] = draft[:n], tokens[n] = argmax of target row n, entries past n are -1. A 1-D draft [d] with
    target_logits [d+1, V] is a batch of one and gives (tokens [d+1], num_accepted []).
    """
    drafts, lengths, single = _batched(draft_tokens, draft_lengths)
    tokens, n = _accept_outputs(drafts)
    _ops.speculative_accept_greedy.default(tokens, n, drafts, lengths, target_logits[None] if single else target_logits)
    return (tokens[0], n[0]) if single else (tokens, n)


def speculative_accept(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, seed, offset=0,
                       draft_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rejection sampling: draft_tokens [B, d], draft_probs [B, d, V], target_probs [B, d+1, V] (normalised
    rows) -> (tokens [B, d+1] int64, num_accepted [B] int64), distributed as sampling from the target.

    Row b, step i accepts draft[i] if u(2i) * draft_probs[i, x] < target_probs[i, x]; on rejection tokens[i] is
    drawn with u(2i+1) from max(0, target - draft) renormalised (from target when that is all zero); when all
    d_b are accepted tokens[d_b] is drawn with u(2 d_b) from target_probs[d_b]. u(k) uses counter offset + k of
    seed (seed / offset: scalars, the same for every row, or [B] tensors). Entries past the last valid one are
    -1. 1-D drafts are a batch of one, as in speculative_accept_greedy.
    """
    drafts, lengths, single = _batched(draft_tokens, draft_lengths)
    B = drafts.shape[0] if drafts.dim() == 2 else 0
    tokens, n = _accept_outputs(drafts)
    device = drafts.device
    seeds = seed if isinstance(seed, Tensor) else torch.full((B,), seed_as_int64(seed), dtype=torch.int64,
                                                             device=device)
    counters = offset if isinstance(offset, Tensor) else torch.full((B,), offset, dtype=torch.int64, device=device)
    if single:
        draft_probs, target_probs = draft_probs[None], target_probs[None]
    _ops.speculative_accept.default(tokens, n, drafts, lengths, draft_probs, target_probs, seeds, counters)
    return (tokens[0], n[0]) if single else (tokens, n)


# The RoPE table: one function for the reference model, the engine and these ops (reference.cos_sin_table).
rotary_cos_sin_cache = cos_sin_table


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """The plain RoPE frequencies theta^(-2i/D), i < D/2, float32 (as HF Llama computes them)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


# ---------------------------------------------------------------------------------------------------
# Fake kernels, for torch.compile and opcheck (every op only mutates its outputs)


def _register_fakes() -> None:
    """Every op mutates caller-owned outputs and returns nothing: its fake kernel does nothing."""
    for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "kv_cache_write", "attention", "silu_and_mul",
                 "linear", "sampling_probs", "sample_from_probs", "sample", "speculative_accept_greedy",
                 "speculative_accept"):
        torch.library.register_fake(f"layerskip::{name}")(lambda *args, **kwargs: None)


_register_fakes()


@torch.library.register_fake("layerskip::linear_quantized")
def _linear_quantized_fake(input, packed, format, out_features, in_features):
    return input.new_empty((input.shape[0], out_features), dtype=torch.float32)


@torch.library.register_fake("layerskip::interleave_quantized")
def _interleave_quantized_fake(packed, format, out_features, in_features):
    rows = (out_features + 15) // 16 * 16
    return packed.new_empty((packed.numel() // max(out_features, 1) * rows,), dtype=torch.uint8)


@torch.library.register_fake("layerskip::dequantize_rows")
def _dequantize_rows_fake(packed, format, out_features, in_features, ids):
    return packed.new_empty((ids.shape[0], in_features), dtype=torch.float32)


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
    k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, rows: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (new k_cache, new v_cache); duplicate (row, position) pairs: the last token wins."""
    k_new, v_new = k_cache.clone(), v_cache.clone()
    for t, (r, p) in enumerate(zip(rows.tolist(), positions.tolist())):
        k_new[r, :, p] = key[t].to(k_cache.dtype)  # [Hkv, D]
        v_new[r, :, p] = value[t].to(v_cache.dtype)
    return k_new, v_new


def attention_reference(query: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, positions: Tensor,
                        scale: float) -> Tensor:
    """Token by token: softmax(scale * q K[:p+1]^T) V[:p+1] over its row's cache."""
    T, Hq, D = query.shape
    Hkv = k_cache.shape[1]
    out = torch.empty(T, Hq, D, dtype=torch.float32)
    for t, (r, p) in enumerate(zip(rows.tolist(), positions.tolist())):
        k = k_cache[r, :, : p + 1].float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, p+1, D]
        v = v_cache[r, :, : p + 1].float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, p+1, D]
        scores = (k @ query[t].float()[:, :, None])[..., 0] * scale  # [Hq, p+1]
        out[t] = (torch.softmax(scores, dim=-1)[:, None, :] @ v)[:, 0]  # [Hq, D]
    return out.to(query.dtype)


def silu_and_mul_reference(input: Tensor) -> Tensor:
    gate, up = input.float().chunk(2, dim=-1)  # [..., I] each
    return (torch.nn.functional.silu(gate) * up).to(input.dtype)


def linear_reference(input: Tensor, weight: Tensor) -> Tensor:
    """The CPU op's result in float32 arithmetic: the input rounded to bf16 first where the op does so."""
    if weight.dtype == torch.bfloat16 and not input.is_cuda and linear_rounds_bf16_inputs():
        input = input.bfloat16()
    return input.float() @ weight.float().T  # [T, N]


def linear_quantized_reference(input: Tensor, packed: Tensor, format: int, out_features: int,
                               in_features: int) -> Tensor:
    """The float matmul on the dequantized weights (no activation rounding), [T, N] float32."""
    from layerskip_ext.quant import FORMAT_NAMES, dequantize
    if format > INTERLEAVED:  # the GGUF rows back, through the kernel's own row extraction
        ids = torch.arange(out_features)
        return input.float() @ dequantize_rows(packed, format, out_features, in_features, ids).T
    w = dequantize(packed.reshape(out_features, -1), FORMAT_NAMES[format], in_features)  # [N, K]
    return input.float() @ w.T


# The sampling semantics have one Python statement, layerskip_ext.sampling (also the reference decoder's);
# these names are the per-op oracles the kernel tests call.


def _scalars(value, n: int) -> list:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n


def sampling_probs_reference(logits: Tensor, temperature, top_k=0, top_p=1.0) -> Tensor:
    """Token by token with layerskip_ext.sampling (temperature 0: one-hot of the first argmax)."""
    n = logits.shape[0]
    rows = []
    for t, (temp, k, p) in enumerate(zip(_scalars(temperature, n), _scalars(top_k, n), _scalars(top_p, n))):
        if temp == 0:
            rows.append(torch.nn.functional.one_hot(logits[t].float().argmax(), logits.shape[1]).float())
        else:
            rows.append(_sampling.sampling_probs(logits[t:t + 1], temp, k, p)[0])
    return torch.stack(rows) if rows else logits.float().clone()


def _draws(seed, offset, n: int) -> list[tuple[int, int]]:
    seeds = _scalars(seed, n)
    counters = offset.tolist() if isinstance(offset, Tensor) else [offset + t for t in range(n)]
    return list(zip(seeds, counters))


def sample_from_probs_reference(probs: Tensor, seed, offset=0) -> Tensor:
    out = [int(_sampling.sample_from_probs(probs[t:t + 1], s, c)[0]) for t, (s, c) in
           enumerate(_draws(seed, offset, probs.shape[0]))]
    return torch.tensor(out, dtype=torch.int64)


def sample_reference(logits: Tensor, temperature, top_k=0, top_p=1.0, seed=0, offset=0) -> Tensor:
    n = logits.shape[0]
    params = zip(_scalars(temperature, n), _scalars(top_k, n), _scalars(top_p, n), _draws(seed, offset, n))
    out = [int(_sampling.sample(logits[t:t + 1], temp, k, p, s, c)[0]) for t, (temp, k, p, (s, c)) in
           enumerate(params)]
    return torch.tensor(out, dtype=torch.int64)


def speculative_accept_greedy_reference(draft_tokens: Tensor, target_logits: Tensor,
                                        draft_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batched form ([B, d] drafts) row by row; a 1-D draft is a batch of one, as in the op wrapper."""
    if draft_tokens.dim() == 1:
        tokens, n = _sampling.speculative_accept_greedy(draft_tokens, target_logits)
        return tokens, torch.tensor(n, dtype=torch.int64)
    B, d = draft_tokens.shape
    lengths = [d] * B if draft_lengths is None else draft_lengths.tolist()
    tokens, accepted = torch.full((B, d + 1), -1, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    for b, db in enumerate(lengths):
        t, n = _sampling.speculative_accept_greedy(draft_tokens[b, :db], target_logits[b, : db + 1])
        tokens[b, : db + 1], accepted[b] = t, n
    return tokens, accepted


def speculative_accept_reference(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, seed, offset=0,
                                 draft_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batched form row by row (seed / offset scalars or [B]); a 1-D draft is a batch of one."""
    if draft_tokens.dim() == 1:
        tokens, n = _sampling.speculative_accept(draft_tokens, draft_probs, target_probs, seed, offset)
        return tokens, torch.tensor(n, dtype=torch.int64)
    B, d = draft_tokens.shape
    lengths = [d] * B if draft_lengths is None else draft_lengths.tolist()
    seeds, offsets = _scalars(seed, B), _scalars(offset, B)
    tokens, accepted = torch.full((B, d + 1), -1, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    for b, db in enumerate(lengths):
        t, n = _sampling.speculative_accept(draft_tokens[b, :db], draft_probs[b, :db], target_probs[b, : db + 1],
                                            seeds[b], offsets[b])
        tokens[b, : db + 1], accepted[b] = t, n
    return tokens, accepted


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
