"""Tests of the layerskip ops (except linear, tested in its own file) against the PyTorch references
in layerskip_ext.ops: shape/dtype grids, opcheck, argument errors, and statistical tests of sampling.

bfloat16 tolerance: the kernel's error against the float32 reference may be at most a small multiple
of the error of the same computation done by plain PyTorch in bfloat16 (flash-attention's rule).
"""
from collections import Counter

import pytest
import torch

from layerskip_ext import ops

from chi_square import chi2_statistic, chi_square_limit
from devices import DEVICES  # cpu, and cuda (skipped without a GPU)

DTYPES = [torch.float32, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype=dtype, device=device)


def assert_matches(out, ref32, baseline=None, rtol=1e-5, atol=1e-5, factor=2.0):
    """float32: allclose to the reference; bfloat16: max error <= factor * the bf16 baseline's."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref32.cpu(), rtol=rtol, atol=atol)
        return
    assert baseline is not None
    err = (out.cpu().float() - ref32.cpu().float()).abs().max().item()
    base = (baseline.cpu().float() - ref32.cpu().float()).abs().max().item()
    assert err <= factor * base + 1e-6, f"bf16 error {err} vs baseline {base}"


# ---------------------------------------------------------------------------------------------------
# rms_norm, fused_add_rms_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 37])
@pytest.mark.parametrize("H", [64, 576])
def test_rms_norm(device, dtype, T, H):
    x32, w32 = randn(T, H, seed=1), randn(H, seed=2) * 0.5 + 1
    x, w = x32.to(device, dtype), w32.to(device, dtype)
    out = ops.rms_norm(x, w, 1e-5)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = ops.rms_norm_reference(x.float(), w.float(), 1e-5)
    baseline = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # all in dtype
    assert_matches(out, ref, baseline)


def test_rms_norm_batched_and_f32_weight():
    x = randn(2, 5, 64, seed=3, dtype=torch.bfloat16)
    w = randn(64, seed=4)
    out = ops.rms_norm(x, w, 1e-6)
    assert out.shape == (2, 5, 64) and out.dtype == torch.bfloat16
    ref = ops.rms_norm_reference(x.float(), w, 1e-6)
    assert_matches(out, ref, (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 16, 37])
@pytest.mark.parametrize("H", [64, 576])
def test_fused_add_rms_norm(device, dtype, T, H):
    x, res, w = (randn(T, H, seed=5, dtype=dtype, device=device), randn(T, H, seed=6, dtype=dtype, device=device),
                 randn(H, seed=7, dtype=dtype, device=device))
    ref_out, ref_res = ops.fused_add_rms_norm_reference(x, res, w, 1e-5)
    residual = res.clone()
    out = ops.fused_add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(residual, ref_res, rtol=0, atol=0)  # one rounding of the sum, like torch's add
    ref32 = ops.rms_norm_reference(ref_res.float(), w.float(), 1e-5)
    baseline = w * (ref_res * torch.rsqrt(ref_res.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert_matches(out, ref32, baseline)
    assert_matches(out, ref_out.float(), baseline)


def test_norm_opcheck():
    x, w = randn(3, 64, seed=8), randn(64, seed=9)
    torch.library.opcheck(torch.ops.layerskip.rms_norm.default, (torch.empty_like(x), x, w, 1e-5))
    xb = x.bfloat16()
    torch.library.opcheck(torch.ops.layerskip.rms_norm.default, (torch.empty_like(xb), xb, w.bfloat16(), 1e-5))
    torch.library.opcheck(torch.ops.layerskip.fused_add_rms_norm.default,
                          (torch.empty_like(x), x, randn(3, 64, seed=10), w, 1e-5))


def test_norm_errors():
    x, w = randn(3, 64), randn(64)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must have shape \[64\]"):
        ops.rms_norm(x, randn(32), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: input must be float32 or bfloat16"):
        ops.rms_norm(x.double(), w, 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: eps must be finite and >= 0"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: residual must have the shape of input"):
        ops.fused_add_rms_norm(x, randn(4, 64), w, 1e-5)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: residual .* must be contiguous"):
        ops.fused_add_rms_norm(x, randn(64, 3).T, w, 1e-5)
    with pytest.raises(RuntimeError, match=r"rms_norm: out must have shape \[3, 64\]"):
        torch.ops.layerskip.rms_norm.default(torch.empty(3, 32), x, w, 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: out must be Float"):
        torch.ops.layerskip.rms_norm.default(torch.empty(3, 64, dtype=torch.bfloat16), x, w, 1e-5)


# ---------------------------------------------------------------------------------------------------
# rotary_embedding

HEADS = [(9, 3), (4, 4), (8, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 37])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_rotary_embedding(device, dtype, T, heads, D):
    Hq, Hkv = heads
    cache = ops.rotary_cos_sin_cache(ops.rope_inv_freq(D, 100000.0), 256)  # [256, D]
    positions = torch.randint(0, 256, (T,), generator=gen(T))
    q, k = randn(T, Hq, D, seed=11, dtype=dtype), randn(T, Hkv, D, seed=12, dtype=dtype)
    ref_q, ref_k = ops.rotary_embedding_reference(q.float(), k.float(), positions, cache)
    qo, ko = q.clone().to(device), k.clone().to(device)
    ops.rotary_embedding(qo, ko, positions.to(device), cache.to(device))
    half = D // 2
    c, s = cache[positions][:, None, :half].to(dtype), cache[positions][:, None, half:].to(dtype)

    def baseline(x):  # HF Llama's apply_rotary_pos_emb in dtype
        cos, sin = torch.cat([c, c], -1), torch.cat([s, s], -1)
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    assert_matches(qo, ref_q, baseline(q))
    assert_matches(ko, ref_k, baseline(k))


def test_rotary_matches_transformers_llama():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, Hq, Hkv, D = 5, 4, 2, 64
    positions = torch.tensor([0, 1, 7, 30, 31])
    inv_freq = ops.rope_inv_freq(D, 10000.0)
    angles = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([angles, angles], -1)  # [T, D]
    q, k = randn(T, Hq, D, seed=13), randn(T, Hkv, D, seed=14)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None])
    qo, ko = q.clone(), k.clone()
    ops.rotary_embedding(qo, ko, positions, ops.rotary_cos_sin_cache(inv_freq, 64))
    torch.testing.assert_close(qo, hf_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, hf_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_rotary_strided_views_of_fused_qkv():
    T, Hq, Hkv, D = 4, 4, 2, 32
    qkv = randn(T, (Hq + 2 * Hkv) * D, seed=15)  # [T, (Hq + 2 Hkv) D]
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    v_before = qkv[:, (Hq + Hkv) * D :].clone()
    positions, cache = torch.tensor([3, 4, 5, 6]), ops.rotary_cos_sin_cache(ops.rope_inv_freq(D, 1e4), 16)
    ref_q, ref_k = ops.rotary_embedding_reference(q, k, positions, cache)
    ops.rotary_embedding(q, k, positions, cache)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)
    assert torch.equal(qkv[:, (Hq + Hkv) * D :], v_before)


def test_rotary_opcheck_and_errors():
    q, k = randn(3, 4, 32, seed=16), randn(3, 2, 32, seed=17)
    cache, pos = ops.rotary_cos_sin_cache(ops.rope_inv_freq(32, 1e4), 8), torch.tensor([0, 3, 7])
    torch.library.opcheck(torch.ops.layerskip.rotary_embedding.default, (q, k, pos, cache))
    with pytest.raises(RuntimeError, match=r"rotary_embedding: positions\[2\] = 8 is outside \[0, 8\)"):
        ops.rotary_embedding(q, k, torch.tensor([0, 1, 8]), cache)
    with pytest.raises(RuntimeError, match="rotary_embedding: positions must be int64"):
        ops.rotary_embedding(q, k, pos.int(), cache)
    with pytest.raises(RuntimeError, match=r"rotary_embedding: cos_sin_cache must have shape \[max_pos, 32\]"):
        ops.rotary_embedding(q, k, pos, cache[:, :16])
    with pytest.raises(RuntimeError, match="rotary_embedding: key must have the dtype of query"):
        ops.rotary_embedding(q, k.bfloat16(), pos, cache)
    with pytest.raises(RuntimeError, match="rotary_embedding: query must have stride 1 in its last dimension"):
        ops.rotary_embedding(randn(3, 32, 4).transpose(1, 2), k, pos, cache)


# ---------------------------------------------------------------------------------------------------
# kv_cache_write


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("Hkv", [1, 3])
@pytest.mark.parametrize("B", [1, 3])
def test_kv_cache_write(device, cache_dtype, src_dtype, T, Hkv, B):
    S, D = 40, 64
    k_cache = randn(B, Hkv, S, D, seed=18, dtype=cache_dtype)
    v_cache = randn(B, Hkv, S, D, seed=19, dtype=cache_dtype)
    key, value = randn(T, Hkv, D, seed=20, dtype=src_dtype), randn(T, Hkv, D, seed=21, dtype=src_dtype)
    cells = torch.randperm(B * S, generator=gen(T))[:T]  # distinct (row, position) pairs
    rows, positions = cells // S, cells % S
    ref_k, ref_v = ops.kv_cache_write_reference(k_cache, v_cache, key, value, rows, positions)
    kc, vc = k_cache.to(device), v_cache.to(device)
    ops.kv_cache_write(kc, vc, key.to(device), value.to(device), rows.to(device), positions.to(device))
    assert torch.equal(kc.cpu(), ref_k) and torch.equal(vc.cpu(), ref_v)  # copies (one rounding) are exact


def test_kv_cache_write_duplicate_slots_last_wins():
    kc, vc = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    key = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    rows, positions = torch.tensor([1, 1, 1]), torch.tensor([5, 1, 5])
    ops.kv_cache_write(kc, vc, key, -key, rows, positions)
    assert torch.equal(kc[1, :, 5], key[2]) and torch.equal(kc[1, :, 1], key[1]) and torch.equal(vc[1, :, 5], -key[2])
    assert kc[1, :, [0, 2, 3, 4, 6, 7]].abs().sum() == 0 and kc[0].abs().sum() == 0


def test_kv_cache_write_opcheck_and_errors():
    kc, vc = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    key, value = randn(3, 2, 4), randn(3, 2, 4, seed=1)
    rows, positions = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    torch.library.opcheck(torch.ops.layerskip.kv_cache_write.default, (kc, vc, key, value, rows, positions))
    with pytest.raises(RuntimeError, match=r"kv_cache_write: positions\[1\] = 8 is outside \[0, 8\)"):
        ops.kv_cache_write(kc, vc, key, value, rows, torch.tensor([0, 8, 1]))
    with pytest.raises(RuntimeError, match=r"kv_cache_write: positions\[0\] = -1 is outside"):
        ops.kv_cache_write(kc, vc, key, value, rows, torch.tensor([-1, 0, 1]))
    with pytest.raises(RuntimeError, match=r"kv_cache_write: rows\[2\] = 2 is outside \[0, 2\)"):
        ops.kv_cache_write(kc, vc, key, value, torch.tensor([0, 1, 2]), positions)
    with pytest.raises(RuntimeError, match=r"kv_cache_write: key must have shape \[T, 2, 4\]"):
        ops.kv_cache_write(kc, vc, randn(3, 1, 4), randn(3, 1, 4), rows, positions)
    with pytest.raises(RuntimeError, match="kv_cache_write: k_cache must be contiguous"):
        ops.kv_cache_write(torch.zeros(2, 8, 2, 4).transpose(1, 2), vc, key, value, rows, positions)
    with pytest.raises(RuntimeError, match=r"kv_cache_write: positions must have shape \[3\]"):
        ops.kv_cache_write(kc, vc, key, value, rows, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="kv_cache_write: rows must be Long"):
        ops.kv_cache_write(kc, vc, key, value, rows.int(), positions)


# ---------------------------------------------------------------------------------------------------
# attention


def _attention_case(T, heads, D, start_pos, dtype, seed=0):
    """T tokens of cache row 1 of 2 at positions start_pos .. start_pos + T - 1 (row 0 and the slots past the
    last position are NaN: they must never be read)."""
    Hq, Hkv = heads
    S = start_pos + T + 3
    q = randn(T, Hq, D, seed=seed, dtype=dtype)
    k_cache = randn(2, Hkv, S, D, seed=seed + 1, dtype=dtype)
    v_cache = randn(2, Hkv, S, D, seed=seed + 2, dtype=dtype)
    for cache in (k_cache, v_cache):
        cache[0] = float("nan")
        cache[1, :, start_pos + T :] = float("nan")
    rows, positions = torch.ones(T, dtype=torch.int64), start_pos + torch.arange(T)
    return q, k_cache, v_cache, rows, positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 37])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("start_pos", [0, 5, 100])
def test_attention(device, dtype, T, heads, D, start_pos):
    q, k_cache, v_cache, rows, positions = _attention_case(T, heads, D, start_pos, dtype, seed=T + D)
    scale = D**-0.5
    out = ops.attention(q.to(device), k_cache.to(device), v_cache.to(device), rows.to(device), positions.to(device),
                        scale)
    assert out.shape == q.shape and out.dtype == dtype
    ref = ops.attention_reference(q.float(), k_cache.float(), v_cache.float(), rows, positions, scale)
    baseline = None
    if dtype != torch.float32:  # the same math in dtype
        Hq, Hkv = heads
        n = start_pos + T
        k = k_cache[1, :, :n].repeat_interleave(Hq // Hkv, 0)
        v = v_cache[1, :, :n].repeat_interleave(Hq // Hkv, 0)
        s = (q.transpose(0, 1) @ k.transpose(1, 2)) * scale
        mask = torch.arange(n)[None, :] > (start_pos + torch.arange(T))[:, None]
        baseline = (torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v).transpose(0, 1)
    assert_matches(out, ref, baseline, rtol=2e-5, atol=2e-5)


def test_attention_ragged_rows_are_batch_invariant():
    """Tokens of several rows at different positions in one call: each equals the call with that token alone
    (bit for bit) and the reference."""
    B, Hq, Hkv, S, D = 3, 4, 2, 30, 32
    k_cache, v_cache = randn(B, Hkv, S, D, seed=1), randn(B, Hkv, S, D, seed=2)
    rows, positions = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([7, 0, 8, 29, 13])
    q = randn(5, Hq, D, seed=3)
    out = ops.attention(q, k_cache, v_cache, rows, positions, 0.2)
    torch.testing.assert_close(out, ops.attention_reference(q, k_cache, v_cache, rows, positions, 0.2), rtol=2e-5,
                               atol=2e-5)
    for t in range(5):
        alone = ops.attention(q[t:t + 1], k_cache, v_cache, rows[t:t + 1], positions[t:t + 1], 0.2)
        assert torch.equal(alone[0], out[t])


def test_attention_matches_sdpa_prefill():
    T, Hq, Hkv, D = 12, 6, 2, 32
    q, k_cache, v_cache, rows, positions = _attention_case(T, (Hq, Hkv), D, 0, torch.float32)
    out = ops.attention(q, k_cache, v_cache, rows, positions, D**-0.5)
    k = k_cache[1, :, :T].repeat_interleave(3, 0)
    v = v_cache[1, :, :T].repeat_interleave(3, 0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True)
    torch.testing.assert_close(out, sdpa.transpose(0, 1), rtol=2e-5, atol=2e-5)


def test_attention_single_slot_returns_value():
    q, k_cache, v_cache, rows, positions = _attention_case(1, (2, 1), 16, 0, torch.float32)
    out = ops.attention(q, k_cache, v_cache, rows, positions, 0.25)  # one visible slot: softmax weight 1
    torch.testing.assert_close(out[0], v_cache[1, 0, 0].expand(2, 16), rtol=0, atol=0)


def test_attention_opcheck_and_errors():
    q, k_cache, v_cache, rows, positions = _attention_case(3, (4, 2), 32, 5, torch.float32)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    torch.library.opcheck(torch.ops.layerskip.attention.default,
                          (torch.empty_like(q), q, k_cache, v_cache, rows, positions, 0.1))
    qb = q.bfloat16()
    torch.library.opcheck(torch.ops.layerskip.attention.default,
                          (torch.empty_like(qb), qb, k_cache.bfloat16(), v_cache.bfloat16(), rows, positions - 3, 0.1))
    S = k_cache.shape[2]
    with pytest.raises(RuntimeError, match=rf"attention: positions\[2\] = {S} is outside \[0, {S}\)"):
        ops.attention(q, k_cache, v_cache, rows, torch.tensor([0, 1, S]), 0.1)
    with pytest.raises(RuntimeError, match=r"attention: positions\[0\] = -1 is outside"):
        ops.attention(q, k_cache, v_cache, rows, torch.tensor([-1, 0, 1]), 0.1)
    with pytest.raises(RuntimeError, match=r"attention: rows\[1\] = 2 is outside \[0, 2\)"):
        ops.attention(q, k_cache, v_cache, torch.tensor([0, 2, 1]), positions, 0.1)
    with pytest.raises(RuntimeError, match=r"attention: query heads \(4\) must be a multiple of cache heads \(3\)"):
        ops.attention(q, torch.zeros(2, 3, S, 32), torch.zeros(2, 3, S, 32), rows, positions, 0.1)
    with pytest.raises(RuntimeError, match="attention: k_cache head_dim 16 differs"):
        ops.attention(q, torch.zeros(2, 2, S, 16), torch.zeros(2, 2, S, 16), rows, positions, 0.1)
    with pytest.raises(RuntimeError, match="attention: v_cache must have the dtype of k_cache"):
        ops.attention(q, k_cache, v_cache.bfloat16(), rows, positions, 0.1)
    with pytest.raises(RuntimeError, match=r"attention: positions must have shape \[3\]"):
        ops.attention(q, k_cache, v_cache, rows, positions[:2], 0.1)


# ---------------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 37])
@pytest.mark.parametrize("I", [64, 1536])
def test_silu_and_mul(device, dtype, T, I):
    x = randn(T, 2 * I, seed=T, dtype=dtype, scale=4.0)  # reaches the saturated tails of silu
    out = ops.silu_and_mul(x.to(device))
    assert out.shape == (T, I) and out.dtype == dtype
    ref = ops.silu_and_mul_reference(x.float())
    assert_matches(out, ref, torch.nn.functional.silu(x[:, :I]) * x[:, I:], rtol=1e-5, atol=1e-5)


def test_silu_and_mul_extreme_inputs():
    gate = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0, 200.0])
    x = torch.cat([gate, torch.full_like(gate, 2.0)])[None]
    torch.testing.assert_close(ops.silu_and_mul(x), ops.silu_and_mul_reference(x), rtol=1e-6, atol=1e-30)


def test_silu_and_mul_opcheck_and_errors():
    torch.library.opcheck(torch.ops.layerskip.silu_and_mul.default, (torch.empty(2, 3, 4), randn(2, 3, 8)))
    with pytest.raises(RuntimeError, match="silu_and_mul: the last dimension of input .* must be even"):
        ops.silu_and_mul(randn(2, 7))
    with pytest.raises(RuntimeError, match="silu_and_mul: input must be float32 or bfloat16"):
        ops.silu_and_mul(torch.zeros(2, 8, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------------
# Random numbers


def test_uniform_from_counter_is_splitmix64():
    # splitmix64 from state 0 (Vigna's reference outputs), whose top 53 bits our draw (seed 0) uses.
    outputs = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    for counter, z in enumerate(outputs):
        assert ops.uniform_from_counter(0, counter) == (z >> 11) / 2.0**53
    assert ops.uniform_from_counter(-1, 5) == ops.uniform_from_counter(2**64 - 1, 5)
    draws = [ops.uniform_from_counter(12345, c) for c in range(20000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------------
# sampling_probs


def _mask_and_probs_match(out, ref):
    """Same kept sets (filtered-out tokens are exactly 0) and close probabilities. Below 1e-30 the
    kernel's exp flushes to 0 where torch's reaches denormals, so tiny entries may differ."""
    assert (out[ref == 0] == 0).all(), "the kernel kept a token the reference filtered out"
    assert torch.equal(out > 1e-30, ref > 1e-30), "kept sets differ"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [7, 1000, 49152])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (50, 1.0), (0, 0.9), (0, 0.5), (20, 0.8),
                                         (0, 1e-6), (0, 0.999), (3000, 0.95)])
def test_sampling_probs(device, V, temperature, top_k, top_p):
    logits = randn(3, V, seed=V, scale=3.0)
    out = ops.sampling_probs(logits.to(device), temperature, top_k, top_p).cpu()
    ref = ops.sampling_probs_reference(logits, temperature, top_k, top_p)
    _mask_and_probs_match(out, ref)
    torch.testing.assert_close(out.double().sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    kept = (out > 0).sum(-1)
    if top_k:
        assert (kept <= top_k).all()
    if top_p <= 1e-6:
        assert (kept == 1).all() and torch.equal(out.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.3), (700, 0.9), (0, 0.9999)])
def test_sampling_probs_many_ties(top_k, top_p):
    # quantised logits: long runs of equal values, the kernel's histogram boundaries fall inside them
    logits = torch.cat([torch.zeros(1, 1000), (randn(2, 1000, seed=7) * 4).round() / 2])  # [3, 1000]
    _mask_and_probs_match(ops.sampling_probs(logits, 0.5, top_k, top_p),
                          ops.sampling_probs_reference(logits, 0.5, top_k, top_p))
    if top_k == 5:  # all-equal row: the five lowest indices
        assert (ops.sampling_probs(logits[:1], 1.0, 5, 1.0)[0] > 0).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_sampling_probs_plain_softmax():
    logits = randn(4, 300, seed=3, scale=2.0)
    torch.testing.assert_close(ops.sampling_probs(logits, 0.7, 0, 1.0), torch.softmax(logits / 0.7, -1),
                               rtol=1e-5, atol=1e-8)


def test_sampling_probs_hand_cases():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    # ties rank the lower index first: top_k=1 keeps token 1, top_k=2 keeps tokens 1 and 3
    assert (ops.sampling_probs(logits, 1.0, 1, 1.0) > 0).nonzero()[:, 1].tolist() == [1]
    assert (ops.sampling_probs(logits, 1.0, 2, 1.0) > 0).nonzero()[:, 1].tolist() == [1, 3]
    assert (ops.sampling_probs(logits, 1.0, 3, 1.0) > 0).nonzero()[:, 1].tolist() == [1, 2, 3]
    two = ops.sampling_probs(logits, 1.0, 2, 1.0)
    torch.testing.assert_close(two, torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))
    # probabilities 0.5, 0.3, 0.2: top_p 0.45 keeps {0}; 0.75 keeps {0, 1}; 0.85 keeps all three
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    for top_p, kept in [(0.45, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2])]:
        probs = ops.sampling_probs(logits, 1.0, 0, top_p)
        assert (probs[0] > 0).nonzero()[:, 0].tolist() == kept
        expected = torch.zeros(3)
        expected[kept] = torch.tensor([0.5, 0.3, 0.2])[kept] / torch.tensor([0.5, 0.3, 0.2])[kept].sum()
        torch.testing.assert_close(probs[0], expected)
    # top_k applies before top_p: top_k=2 renormalises to 0.625, 0.375; top_p 0.6 then keeps {0}
    assert (ops.sampling_probs(logits, 1.0, 2, 0.6)[0] > 0).nonzero()[:, 0].tolist() == [0]
    assert (ops.sampling_probs(logits, 1.0, 2, 0.65)[0] > 0).nonzero()[:, 0].tolist() == [0, 1]
    # -inf logits get probability 0
    masked = ops.sampling_probs(torch.tensor([[0.0, float("-inf"), 0.0]]), 1.0, 0, 1.0)
    torch.testing.assert_close(masked, torch.tensor([[0.5, 0.0, 0.5]]))


def test_sampling_probs_opcheck_and_errors():
    logits = randn(2, 50)
    params = (torch.tensor([0.8, 0.0], dtype=torch.float64), torch.tensor([5, 0]),
              torch.tensor([0.9, 1.0], dtype=torch.float64))
    torch.library.opcheck(torch.ops.layerskip.sampling_probs.default, (torch.empty(2, 50), logits, *params))
    with pytest.raises(RuntimeError, match=r"sampling_probs: temperature\[0\] must be finite and >= 0"):
        ops.sampling_probs(logits, -1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"sampling_probs: temperature\[1\] must be finite and >= 0"):
        ops.sampling_probs(logits, [1.0, float("nan")], 0, 1.0)
    with pytest.raises(RuntimeError, match=r"sampling_probs: top_k\[0\] must be >= 0"):
        ops.sampling_probs(logits, 1.0, -1, 1.0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(RuntimeError, match=r"sampling_probs: top_p\[0\] must be in \(0, 1\]"):
            ops.sampling_probs(logits, 1.0, 0, bad)
    with pytest.raises(RuntimeError, match=r"sampling_probs: temperature must have shape \[2\]"):
        ops.sampling_probs(logits, [1.0], 0, 1.0)
    with pytest.raises(RuntimeError, match="sampling_probs: top_p must be Double"):
        ops.sampling_probs(logits, 1.0, 0, torch.ones(2))
    with pytest.raises(RuntimeError, match="sampling_probs: logits row 1 must have a finite maximum"):
        ops.sampling_probs(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"sampling_probs: logits \[T, V\] must have 2 dimensions"):
        ops.sampling_probs(randn(50), 1.0, 0, 1.0)


# ---------------------------------------------------------------------------------------------------
# sample_from_probs, sample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [1, 6, 1000, 49152])
def test_sample_from_probs_matches_reference(device, V):
    probs = torch.rand(8, V, generator=gen(V))  # unnormalised rows
    probs[probs < 0.3] = 0.0
    probs[:, 0] = 0.0 if V > 1 else 1.0
    for seed, offset in [(0, 0), (7, 100), (-3, 5), (2**62, 2**40)]:
        out = ops.sample_from_probs(probs.to(device), seed, offset).cpu()
        assert torch.equal(out, ops.sample_from_probs_reference(probs, seed, offset))
        assert (probs[torch.arange(8), out] > 0).all()


def test_sample_from_probs_frequencies():
    n = 40000
    p = torch.tensor([0.05, 0.0, 0.25, 0.1, 0.3, 0.0, 0.2, 0.1]) * 3  # unnormalised on purpose
    probs = p.expand(n, -1).contiguous()  # row t uses draw t
    for seed in (1, 2, 3):
        counts = Counter(ops.sample_from_probs(probs, seed, 0).tolist())
        expected = {i: float(p[i] / p.sum()) for i in range(8) if p[i] > 0}
        stat, df = chi2_statistic(counts, expected, n)
        assert stat < chi_square_limit(df, z=4.75), (seed, stat, df)


def test_sample_from_probs_edges():
    # a single positive entry is always drawn; one-hot rows at any position
    probs = torch.zeros(5, 10)
    probs[torch.arange(5), torch.tensor([0, 9, 3, 3, 7])] = 0.1
    assert ops.sample_from_probs(probs, 11, 0).tolist() == [0, 9, 3, 3, 7]
    # u = uniform(seed, offset + t) picks the interval it falls in: a uniform row of 2^k entries
    uniform = torch.ones(4, 1024)
    out = ops.sample_from_probs(uniform, 5, 17).tolist()
    assert out == [int(ops.uniform_from_counter(5, 17 + t) * 1024) for t in range(4)]


def test_sample_from_probs_opcheck_and_errors():
    probs = torch.rand(3, 20, generator=gen(0))
    torch.library.opcheck(torch.ops.layerskip.sample_from_probs.default,
                          (torch.empty(3, dtype=torch.int64), probs, torch.tensor([3, 3, -5]), torch.tensor([4, 5, 0])))
    with pytest.raises(RuntimeError, match=r"sample_from_probs: probs\[1, 2\] must be finite and >= 0"):
        bad = probs.clone()
        bad[1, 2] = -0.5
        ops.sample_from_probs(bad, 0, 0)
    with pytest.raises(RuntimeError, match=r"sample_from_probs: probs\[0, 4\] must be finite and >= 0"):
        bad = probs.clone()
        bad[0, 4] = float("nan")
        ops.sample_from_probs(bad, 0, 0)
    with pytest.raises(RuntimeError, match="sample_from_probs: probs row 2 must have a positive finite sum"):
        bad = probs.clone()
        bad[2] = 0
        ops.sample_from_probs(bad, 0, 0)
    with pytest.raises(RuntimeError, match="sample_from_probs: probs must be float32"):
        ops.sample_from_probs(probs.double(), 0, 0)
    with pytest.raises(RuntimeError, match=r"sample_from_probs: counters\[0\] = -1 is outside"):
        ops.sample_from_probs(probs, 0, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.0, 3, 0.5), (1.0, 0, 1.0), (0.7, 40, 1.0),
                                                     (1.3, 0, 0.9), (1.0, 10, 0.8)])
def test_sample_matches_reference(device, temperature, top_k, top_p):
    logits = randn(5, 2000, seed=21, scale=2.0)
    for seed in (0, 1, 99):
        out = ops.sample(logits.to(device), temperature, top_k, top_p, seed, 3).cpu()
        assert torch.equal(out, ops.sample_reference(logits, temperature, top_k, top_p, seed, 3))
        if temperature == 0:
            assert torch.equal(out, logits.argmax(-1))
        else:  # only kept tokens are drawn
            assert (ops.sampling_probs_reference(logits, temperature, top_k, top_p)[torch.arange(5), out] > 0).all()


def test_sample_greedy_ties_and_bf16():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    assert ops.sample(logits, 0.0, 0, 1.0, 0, 0).tolist() == [1, 0]
    assert ops.sample(logits.bfloat16(), 0.0, 0, 1.0, 0, 0).tolist() == [1, 0]


def test_sample_seed_reproducibility():
    logits = randn(64, 500, seed=4)
    a = ops.sample(logits, 1.0, 0, 0.95, 1234, 0)
    assert torch.equal(a, ops.sample(logits, 1.0, 0, 0.95, 1234, 0))
    assert not torch.equal(a, ops.sample(logits, 1.0, 0, 0.95, 1235, 0))
    # row t uses counter offset + t: shifting the offset by one shifts the rows' draws
    shifted = ops.sample(logits[1:], 1.0, 0, 0.95, 1234, 1)
    assert torch.equal(a[1:], shifted)
    assert torch.equal(ops.sample(logits, 1.0, 0, 0.95, -1, 0), ops.sample(logits, 1.0, 0, 0.95, 2**64 - 1, 0))


def test_sample_top_k_frequencies():
    n = 30000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0]).expand(n, -1).contiguous()
    counts = Counter(ops.sample(logits, 1.0, 3, 1.0, 42, 0).tolist())
    p = ops.sampling_probs_reference(logits[:1], 1.0, 3, 1.0)[0]
    expected = {i: float(p[i]) for i in range(6) if p[i] > 0}
    assert set(expected) == {0, 1, 5}
    stat, df = chi2_statistic(counts, expected, n)
    assert stat < chi_square_limit(df, z=4.75)


def test_sample_opcheck_and_errors():
    logits = randn(2, 30)
    f64 = dict(dtype=torch.float64)
    for temperature in ([0.9, 0.9], [0.0, 0.7]):
        torch.library.opcheck(torch.ops.layerskip.sample.default,
                              (torch.empty(2, dtype=torch.int64), logits, torch.tensor(temperature, **f64),
                               torch.tensor([4, 0]), torch.tensor([0.9, 1.0], **f64), torch.tensor([5, 6]),
                               torch.tensor([0, 1])))
    with pytest.raises(RuntimeError, match=r"sample: temperature\[0\] must be finite and >= 0"):
        ops.sample(logits, -0.1, 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"sample: top_p\[0\] must be in \(0, 1\]"):
        ops.sample(logits, 0.0, 0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"sample: top_k\[0\] must be >= 0"):
        ops.sample(logits, 1.0, -2, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"sample: seeds must have shape \[2\]"):
        ops.sample(logits, 1.0, 0, 1.0, torch.tensor([1]), 0)


# ---------------------------------------------------------------------------------------------------
# speculative_accept_greedy


def test_speculative_accept_greedy_hand_cases():
    logits = torch.full((4, 5), -1.0)
    logits[torch.arange(4), torch.tensor([2, 4, 3, 0])] = 1.0  # argmax rows: 2, 4, 3, 0
    cases = [
        ([2, 4, 1], [2, 4, 3, -1], 2),  # rejected at 2: the target's token replaces it
        ([2, 4, 3], [2, 4, 3, 0], 3),  # all accepted plus the bonus token
        ([0, 4, 3], [2, -1, -1, -1], 0),  # rejected at once
    ]
    for draft, tokens, n in cases:
        out, num = ops.speculative_accept_greedy(torch.tensor(draft), logits)
        assert out.tolist() == tokens and num.item() == n and num.dim() == 0 and num.dtype == torch.int64
        ref, ref_num = ops.speculative_accept_greedy_reference(torch.tensor(draft), logits)
        assert out.tolist() == ref.tolist() and num.item() == ref_num.item()
    out, num = ops.speculative_accept_greedy(torch.zeros(0, dtype=torch.int64), logits[:1])  # d = 0
    assert out.tolist() == [2] and num.item() == 0
    ties = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])  # argmax: first maximum
    assert ops.speculative_accept_greedy(torch.tensor([1]), ties)[0].tolist() == [0, -1]
    assert ops.speculative_accept_greedy(torch.tensor([0]), ties.bfloat16())[0].tolist() == [0, 1]


@pytest.mark.parametrize("d", [1, 4, 8])
def test_speculative_accept_greedy_random(d):
    for seed in range(20):
        logits = randn(d + 1, 50, seed=seed)
        best = logits.argmax(-1)
        draft = best[:d].clone()
        cut = seed % (d + 1)
        if cut < d:
            draft[cut] = (draft[cut] + 1) % 50
        out, num = ops.speculative_accept_greedy(draft, logits)
        ref, ref_num = ops.speculative_accept_greedy_reference(draft, logits)
        assert torch.equal(out, ref) and num.item() == ref_num.item() == cut


def test_speculative_accept_greedy_opcheck_and_errors():
    logits, draft = randn(4, 10), torch.tensor([1, 2, 3])
    torch.library.opcheck(torch.ops.layerskip.speculative_accept_greedy.default,
                          (torch.empty(1, 4, dtype=torch.int64), torch.empty(1, dtype=torch.int64), draft[None],
                           torch.tensor([2]), logits[None]))
    with pytest.raises(RuntimeError, match=r"speculative_accept_greedy: target_logits must have shape \[1, 4, V\]"):
        ops.speculative_accept_greedy(draft, logits[:3])
    with pytest.raises(RuntimeError, match=r"speculative_accept_greedy: draft_lengths\[0\] = 4 is outside"):
        ops.speculative_accept_greedy(draft[None], logits[None], torch.tensor([4]))
    with pytest.raises(RuntimeError, match=r"speculative_accept_greedy: draft_tokens\[0, 1\] = 10 is outside"):
        ops.speculative_accept_greedy(torch.tensor([1, 10, 3]), logits)
    with pytest.raises(RuntimeError, match="speculative_accept_greedy: draft_tokens must be int64"):
        ops.speculative_accept_greedy(draft.int(), logits)


# ---------------------------------------------------------------------------------------------------
# speculative_accept (rejection sampling)


def _random_probs(rows, V, seed, zeros=True):
    g = gen(seed)
    p = torch.rand(rows, V, generator=g) ** 2
    if zeros:
        p[torch.rand(rows, V, generator=g) < 0.25] = 0.0
        p[:, 0] += 0.05  # every row keeps some mass
    return p / p.sum(-1, keepdim=True)


def speculative_output_distribution(draft_probs, target_probs):
    """Exact distribution of speculative_accept's output, by enumerating drafts and accept / reject.

    -> {tuple(valid tokens): probability}; the draft token at step i is drawn from draft_probs[i].
    """
    q, p = draft_probs.double(), target_probs.double()
    q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)  # exactly normalised in float64
    d, V = p.shape[0] - 1, p.shape[1]
    dist = {}

    def step(i, prefix, prob):
        if i == d:  # all accepted: bonus token from the target
            for y in range(V):
                if p[d, y] > 0:
                    dist[prefix + (y,)] = dist.get(prefix + (y,), 0.0) + prob * float(p[d, y])
            return
        residual = torch.clamp(p[i] - q[i], min=0.0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        for x in range(V):
            if q[i, x] == 0:
                continue
            accept = min(1.0, float(p[i, x] / q[i, x]))
            if accept > 0:
                step(i + 1, prefix + (x,), prob * float(q[i, x]) * accept)
            if accept < 1:
                for y in range(V):
                    if residual[y] > 0:
                        key = prefix + (y,)
                        dist[key] = dist.get(key, 0.0) + prob * float(q[i, x]) * (1 - accept) * float(residual[y])

    step(0, (), 1.0)
    return dist


@pytest.mark.parametrize("V,d", [(4, 1), (5, 2), (6, 3), (4, 3)])
def test_speculative_accept_distribution_is_target_analytically(V, d):
    q, p = _random_probs(d, V, seed=V * 10 + d), _random_probs(d + 1, V, seed=V * 10 + d + 1)
    dist = speculative_output_distribution(q, p)
    p = p.double() / p.double().sum(-1, keepdim=True)  # as normalised inside the enumeration
    assert abs(sum(dist.values()) - 1.0) < 1e-12
    # Position k given the prefix tokens[:k] (all accepted drafts) follows target row k.
    for k in range(d + 1):
        prefixes = {key[:k] for key in dist if len(key) > k}
        for prefix in prefixes:
            reach = sum(v for key, v in dist.items() if len(key) > k and key[:k] == prefix)
            for y in range(V):
                joint = sum(v for key, v in dist.items() if len(key) > k and key[: k + 1] == prefix + (y,))
                assert abs(joint / reach - float(p[k, y])) < 1e-9, (k, prefix, y)


@pytest.mark.parametrize("V,d", [(4, 1), (5, 2), (6, 3)])
def test_speculative_accept_empirical_distribution(V, d):
    q, p = _random_probs(d, V, seed=V + d), _random_probs(d + 1, V, seed=V + d + 100)
    dist = speculative_output_distribution(q, p)
    n = 20000
    draft_all = ops.sample_from_probs(q.repeat(n, 1), 777, 0).view(n, d)  # n independent drafts
    counts = Counter()
    for s in range(n):
        tokens, num = ops.speculative_accept(draft_all[s], q, p, s, 0)
        counts[tuple(tokens[: int(num) + 1].tolist())] += 1
        assert (tokens[int(num) + 1 :] == -1).all()
    stat, df = chi2_statistic(counts, dist, n)
    assert df >= 3 and stat < chi_square_limit(df, z=4.75), (stat, df)
    first = torch.bincount(torch.tensor([key[0] for key in counts.elements()]), minlength=V).double() / n
    torch.testing.assert_close(first, p[0].double(), rtol=0, atol=0.02)  # tokens[0] ~ target row 0


@pytest.mark.parametrize("V,d", [(5, 0), (6, 3), (1000, 5)])
def test_speculative_accept_matches_reference(V, d):
    q, p = _random_probs(d, V, seed=1), _random_probs(d + 1, V, seed=2)
    q[:, 1] = 0.0  # a draft token the draft gave probability 0 (accepted iff the target's is > 0)
    q = q / q.sum(-1, keepdim=True)
    for seed in range(60):
        draft = torch.randint(0, V, (d,), generator=gen(seed))
        for offset in (0, 9):
            out, num = ops.speculative_accept(draft, q, p, seed, offset)
            ref, ref_num = ops.speculative_accept_reference(draft, q, p, seed, offset)
            assert torch.equal(out, ref) and num.item() == ref_num.item()
            assert num.dim() == 0 and num.dtype == torch.int64
            assert out[: int(num)].tolist() == draft[: int(num)].tolist()


def test_speculative_accept_identical_draft_accepts_all():
    p = _random_probs(4, 7, seed=5)
    for seed in range(30):
        draft = ops.sample_from_probs(p[:3], seed + 1000, 0)
        out, num = ops.speculative_accept(draft, p[:3], p, seed, 0)
        assert num.item() == 3 and out[:3].tolist() == draft.tolist()


def test_speculative_accept_residual_fallback_to_target():
    # draft row 0 == target row 0 but the draft token has target probability 0: rejected, and the
    # residual max(0, p - q) is all zero, so the replacement is drawn from the target row.
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    out, num = ops.speculative_accept(torch.tensor([2]), p[:1].clone(), p, 3, 0)
    assert num.item() == 0 and out[0].item() in (0, 1) and out[1].item() == -1
    ref, _ = ops.speculative_accept_reference(torch.tensor([2]), p[:1].clone(), p, 3, 0)
    assert torch.equal(out, ref)


def test_speculative_accept_opcheck_and_errors():
    q, p, draft = _random_probs(2, 8, seed=1), _random_probs(3, 8, seed=2), torch.tensor([1, 2])
    torch.library.opcheck(torch.ops.layerskip.speculative_accept.default,
                          (torch.empty(1, 3, dtype=torch.int64), torch.empty(1, dtype=torch.int64), draft[None],
                           torch.tensor([2]), q[None], p[None], torch.tensor([3]), torch.tensor([0])))
    with pytest.raises(RuntimeError, match=r"speculative_accept: draft_probs must have shape \[1, 2, 8\]"):
        ops.speculative_accept(draft, q[:1], p, 0, 0)
    with pytest.raises(RuntimeError, match=r"speculative_accept: target_probs must have shape \[1, 3, V\]"):
        ops.speculative_accept(draft, q, p[:2], 0, 0)
    with pytest.raises(RuntimeError, match=r"speculative_accept: draft_tokens\[0, 0\] = -1 is outside"):
        ops.speculative_accept(torch.tensor([-1, 2]), q, p, 0, 0)
    with pytest.raises(RuntimeError, match="speculative_accept: target_probs must be float32"):
        ops.speculative_accept(draft, q, p.double(), 0, 0)
    with pytest.raises(RuntimeError, match=r"speculative_accept: counters\[0\] = -4 is outside"):
        ops.speculative_accept(draft, q, p, 0, -4)


# ---------------------------------------------------------------------------------------------------
# Per-token parameters and batched acceptance (the engine's batched use)


def test_sampling_per_token_parameters_match_reference():
    """Every token with its own temperature (0: one-hot argmax / greedy), top_k, top_p, seed and counter."""
    logits = randn(6, 300, seed=12, scale=2.0)
    temperature = [0.0, 0.7, 1.3, 0.0, 1.0, 2.0]
    top_k, top_p = [0, 5, 0, 3, 40, 0], [1.0, 1.0, 0.8, 0.5, 0.9, 0.95]
    seeds, counters = torch.tensor([1, 2, 3, 4, 5, -6]), torch.tensor([0, 7, 7, 1, 100, 3])
    probs = ops.sampling_probs(logits, temperature, top_k, top_p)
    _mask_and_probs_match(probs, ops.sampling_probs_reference(logits, temperature, top_k, top_p))
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), 300).float())
    out = ops.sample(logits, temperature, top_k, top_p, seeds, counters)
    assert torch.equal(out, ops.sample_reference(logits, temperature, top_k, top_p, seeds, counters))
    assert out[0] == logits[0].argmax() and out[3] == logits[3].argmax()
    assert torch.equal(ops.sample_from_probs(probs, seeds, counters), out)  # one-hot rows draw their argmax
    for t in range(6):  # each token alone gives the same result (batch invariance)
        alone = ops.sample(logits[t:t + 1], temperature[t], top_k[t], top_p[t], seeds[t:t + 1], counters[t:t + 1])
        assert alone.item() == out[t].item()


def test_speculative_accept_batched_ragged_matches_rows_alone():
    B, d, V = 4, 3, 9
    lengths = torch.tensor([3, 0, 2, 1])
    q = torch.stack([_random_probs(d, V, seed=b) for b in range(B)])           # [B, d, V]
    p = torch.stack([_random_probs(d + 1, V, seed=b + 50) for b in range(B)])  # [B, d + 1, V]
    logits = randn(B, d + 1, V, seed=8)
    for trial in range(10):
        drafts = torch.randint(0, V, (B, d), generator=gen(trial))
        drafts[2, 2] = 99  # past row 2's length: never read
        seeds, counters = torch.tensor([trial, 5, -3, 7]), torch.tensor([0, 4, 9, 1])
        tokens, n = ops.speculative_accept(drafts, q, p, seeds, counters, draft_lengths=lengths)
        ref, ref_n = ops.speculative_accept_reference(drafts, q, p, seeds, counters, draft_lengths=lengths)
        assert torch.equal(tokens, ref) and torch.equal(n, ref_n)
        g_tokens, g_n = ops.speculative_accept_greedy(drafts, logits, draft_lengths=lengths)
        g_ref, g_ref_n = ops.speculative_accept_greedy_reference(drafts, logits, draft_lengths=lengths)
        assert torch.equal(g_tokens, g_ref) and torch.equal(g_n, g_ref_n)
        for b in range(B):
            db = int(lengths[b])
            alone, n_alone = ops.speculative_accept(drafts[b, :db], q[b, :db], p[b, : db + 1], int(seeds[b]),
                                                    int(counters[b]))
            assert tokens[b, : db + 1].tolist() == alone.tolist() and n[b] == n_alone
            assert (tokens[b, db + 1:] == -1).all()
