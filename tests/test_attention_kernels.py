"""torch.ops.layerskip.attention's CPU kernels (every one this CPU has, forced in turn) against
ops.attention_reference, on the calls the engine makes: batched decode (one token per row, ragged positions),
self-speculative verify blocks (consecutive tokens of one row at consecutive positions), mixes of both with
rows in any order, GQA ratios 1/2/3/4/8, head_dim 32/64/80/128 (and odd ones), float32 and bfloat16 caches
and queries, positions 0 and at the cache's last slot, long contexts. Batch invariance bit for bit: each
token's output equals the call with that token alone, in another order, and on one thread. Slots a token
must not read hold NaN."""
import random

import pytest
import torch

import layerskip_ext._C  # noqa: F401  (registers torch.ops.layerskip.*)
from layerskip_ext import ops

KERNELS = ops.attention_kernels()


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    ops.set_attention_kernel("auto")


def make_call(seed, T, batch, capacity):
    """rows, positions [T] of a random call: segments of consecutive positions of one row (verify blocks) and
    single tokens, shuffled, with position 0 and the last slot present when T allows."""
    rng = random.Random(seed)
    rows, positions = [], []
    while len(rows) < T:
        length = min(T - len(rows), rng.choice([1, 1, 2, 4, 5]))
        start = rng.choice([0, capacity - length, rng.randrange(0, capacity - length + 1)])
        row = rng.randrange(batch)
        rows += [row] * length
        positions += list(range(start, start + length))
    order = list(range(T))
    segments_first = rng.random() < 0.5  # keep blocks together half the time, else interleave tokens
    if not segments_first:
        rng.shuffle(order)
    return torch.tensor([rows[i] for i in order]), torch.tensor([positions[i] for i in order])


def make_caches(batch, kv_heads, capacity, D, dtype, rows, positions, seed):
    """k, v [B, Hkv, S, D] random, NaN past the last position any token of the call reads in each row."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, capacity, D, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, capacity, D, generator=g).to(dtype)
    for b in range(batch):
        reads = positions[rows == b]
        first_unread = int(reads.max()) + 1 if len(reads) else 0
        k[b, :, first_unread:] = float("nan")
        v[b, :, first_unread:] = float("nan")
    return k, v


def check_call(q, k, v, rows, positions, scale):
    out = ops.attention(q, k, v, rows, positions, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = ops.attention_reference(q.float(), k, v, rows, positions, scale)  # float32
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    else:  # the float32 result rounded to bfloat16: at most one unit in the last place apart
        torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=8e-3, atol=1e-5)
    T = q.shape[0]
    for t in range(T):  # alone
        alone = ops.attention(q[t:t + 1], k, v, rows[t:t + 1], positions[t:t + 1], scale)
        assert torch.equal(alone[0], out[t]), f"token {t} alone differs"
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))  # another order
    permuted = ops.attention(q[perm], k, v, rows[perm], positions[perm], scale)
    assert torch.equal(permuted, out[perm])
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_mixed_calls_match_reference_and_are_batch_invariant(kernel, ratio, D, cache_dtype):
    ops.set_attention_kernel(kernel)
    B, Hkv, S = 3, 2, 37
    for T in range(1, 10):
        seed = T * 1000 + ratio * 10 + D
        rows, positions = make_call(seed, T, B, S)
        k, v = make_caches(B, Hkv, S, D, cache_dtype, rows, positions, seed)
        q = torch.randn(T, Hkv * ratio, D, generator=torch.Generator().manual_seed(seed + 1))
        check_call(q, k, v, rows, positions, D**-0.5)
        if T in (1, 5):
            check_call(q.bfloat16(), k, v, rows, positions, 0.3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("D", [1, 15, 17, 48, 96, 200, 256])
def test_odd_head_dims(kernel, D):
    """head_dim not a multiple of 16 (masked tails), and several slices of 8 x 16 dims."""
    ops.set_attention_kernel(kernel)
    rows, positions = torch.tensor([0, 1, 1, 1, 0]), torch.tensor([3, 10, 11, 12, 0])
    k, v = make_caches(2, 1, 20, D, torch.float32, rows, positions, seed=D)
    q = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(D))
    check_call(q, k, v, rows, positions, 0.7)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_long_contexts(kernel, cache_dtype):
    """SmolLM2's heads (9 query, 3 kv, D 64) at positions around 1000: a batch of 8 rows, a verify block of 9,
    runs longer than 8 tokens (a prefill chunk) and their one-thread results."""
    ops.set_attention_kernel(kernel)
    B, Hkv, S, D = 8, 3, 1030, 64
    g = torch.Generator().manual_seed(7)
    cases = [(torch.arange(8), torch.tensor([1000, 999, 1029, 0, 517, 1001, 16, 15])),
             (torch.full((9,), 5), torch.arange(1000, 1009)),
             (torch.full((20,), 2), torch.arange(990, 1010))]
    for rows, positions in cases:
        k, v = make_caches(B, Hkv, S, D, cache_dtype, rows, positions, seed=len(rows))
        q = torch.randn(len(rows), 9, D, generator=g)
        out = check_call(q, k, v, rows, positions, 0.125)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ops.attention(q, k, v, rows, positions, 0.125), out)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_slots_past_a_tokens_position_are_not_read(kernel):
    """Two tokens of one row in one call at positions 3 and 20 with NaN in the slots between: the first token
    reads only slots 0..3 (finite, equal to the reference and to its call alone); the second one sees the NaN."""
    ops.set_attention_kernel(kernel)
    D = 64
    k, v = torch.randn(1, 2, 24, D), torch.randn(1, 2, 24, D)
    k[:, :, 4:20] = float("nan")
    v[:, :, 4:20] = float("nan")
    rows, positions = torch.tensor([0, 0]), torch.tensor([3, 20])
    q = torch.randn(2, 6, D)
    out = ops.attention(q, k, v, rows, positions, 0.125)
    torch.testing.assert_close(out[0], ops.attention_reference(q, k, v, rows, positions, 0.125)[0], rtol=2e-5,
                               atol=2e-5)
    assert torch.equal(out[0], ops.attention(q[:1], k, v, rows[:1], positions[:1], 0.125)[0])
    assert out[1].isnan().all()


def test_kernel_choice():
    assert KERNELS[-1] == "plain" and ops.attention_kernel() == KERNELS[0]
    for name in KERNELS:
        ops.set_attention_kernel(name)
        assert ops.attention_kernel() == name
    with pytest.raises(RuntimeError, match="unknown attention kernel 'simd': expected auto, avx512, avx2 or plain"):
        ops.set_attention_kernel("simd")


def test_kernels_agree():
    """Every kernel against the plain one (the arithmetic of the kernel before the avx512 one) on one call."""
    rows, positions = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([40, 41, 42, 7, 63])
    k, v = make_caches(3, 3, 64, 64, torch.float32, rows, positions, seed=3)
    q = torch.randn(5, 9, 64)
    ops.set_attention_kernel("plain")
    plain = ops.attention(q, k, v, rows, positions, 0.125)
    for name in KERNELS:
        ops.set_attention_kernel(name)
        torch.testing.assert_close(ops.attention(q, k, v, rows, positions, 0.125), plain, rtol=1e-5, atol=1e-6)
