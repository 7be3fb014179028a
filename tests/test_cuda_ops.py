"""The CUDA kernels against the CPU ops (the reference implementation), on float32, float16 and bfloat16.

Tolerances: float32 results must be allclose to the CPU op's; a float16 / bfloat16 result's max error against the
float32 CPU op may be at most a small multiple of the error of the same math done by plain PyTorch in that dtype
on the GPU (the same-dtype baseline). Seeded sampling and speculative acceptance must give the CPU's tokens.
Also: what the CUDA ops do with invalid tensor contents (documented in csrc/cuda/*_cuda.cpp), error messages, and
capture of a step of ops in a CUDA graph. Skipped (reported as skipped) without a GPU.
"""
import pytest
import torch

from layerskip_ext import ops
from devices import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32] + HALF_DTYPES


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def check(out, ref32, baseline=None, rtol=2e-5, atol=2e-5, factor=2.0):
    """out (CUDA) against the float32 CPU result; half types against factor * the same-dtype baseline's error."""
    out, ref32 = out.cpu(), ref32.cpu().float()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=rtol, atol=atol)
        return
    err = (out.float() - ref32).abs().max().item()
    base = (baseline.cpu().float() - ref32).abs().max().item()
    assert err <= factor * base + 1e-6, f"{out.dtype} error {err} vs same-dtype baseline {base}"


# ---- norms and activation


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("w_f32", [False, True])
@pytest.mark.parametrize("T,H", [(1, 64), (5, 576), (64, 2051)])
def test_rms_norm_and_fused_add(dtype, w_f32, T, H):
    x, res, w = randn(T, H, seed=1), randn(T, H, seed=2), randn(H, seed=3) * 0.5 + 1
    wd = torch.float32 if w_f32 else dtype
    xc, resc, wc = x.to("cuda", dtype), res.to("cuda", dtype), w.to("cuda", wd)
    ref = ops.rms_norm(xc.float().cpu(), wc.float().cpu(), 1e-5)
    baseline = wc.to(dtype) * (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5))
    check(ops.rms_norm(xc, wc, 1e-5), ref, baseline)

    residual = resc.clone()
    out = ops.fused_add_rms_norm(xc, residual, wc, 1e-5)
    assert torch.equal(residual, resc + xc), "residual += input, rounded once to the dtype"
    ref = ops.rms_norm(residual.float().cpu(), wc.float().cpu(), 1e-5)
    baseline = wc.to(dtype) * (residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5))
    check(out, ref, baseline)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (7, 3072), (2, 3, 10)])
def test_silu_and_mul(dtype, shape):
    x = randn(*shape, seed=4, scale=3.0).to("cuda", dtype)
    ref = ops.silu_and_mul(x.float().cpu())
    gate, up = x.chunk(2, -1)
    check(ops.silu_and_mul(x), ref, torch.nn.functional.silu(gate) * up)


# ---- rotary, kv cache, attention


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 9, 3, 64), (6, 8, 2, 128), (40, 4, 4, 32)])
def test_rotary_embedding_on_fused_qkv_views(dtype, T, Hq, Hkv, D):
    table = ops.rotary_cos_sin_cache(ops.rope_inv_freq(D, 10000.0), 4096)  # [max_pos, D] float32
    qkv = randn(T, (Hq + 2 * Hkv) * D, seed=5).to("cuda", dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)  # strided views, as the engine passes them
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    positions = torch.randint(0, 4096, (T,), generator=torch.Generator().manual_seed(T))
    q_cpu, k_cpu = q.float().cpu().contiguous(), k.float().cpu().contiguous()
    ops.rotary_embedding(q_cpu, k_cpu, positions, table)
    q_base, k_base = ops.rotary_embedding_reference(q, k, positions.cuda(), table.cuda().to(dtype))
    ops.rotary_embedding(q, k, positions.cuda(), table.cuda())
    check(q, q_cpu, q_base)
    check(k, k_cpu, k_base)


def test_rotary_out_of_range_position_is_clamped():
    """The CPU op raises for a position outside [0, max_pos); the CUDA op (no host sync) clamps it."""
    table = ops.rotary_cos_sin_cache(ops.rope_inv_freq(32, 10000.0), 16)
    q, k = randn(2, 2, 32, seed=6), randn(2, 1, 32, seed=7)
    qc, kc = q.cuda(), k.cuda()
    ops.rotary_embedding(qc, kc, torch.tensor([20, -3], device="cuda"), table.cuda())
    ops.rotary_embedding(q, k, torch.tensor([15, 0]), table)
    torch.testing.assert_close(qc.cpu(), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc.cpu(), k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", ALL_DTYPES)
@pytest.mark.parametrize("src_dtype", ALL_DTYPES)
def test_kv_cache_write(cache_dtype, src_dtype):
    B, Hkv, S, D, T = 3, 3, 20, 64, 5
    k_cache = torch.zeros(B, Hkv, S, D, dtype=cache_dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    kv = randn(T, 2 * Hkv * D, seed=8).to("cuda", src_dtype)
    key, value = kv[:, : Hkv * D].view(T, Hkv, D), kv[:, Hkv * D :].view(T, Hkv, D)  # strided views
    rows = torch.tensor([0, 2, 2, 1, 0], device="cuda")
    positions = torch.tensor([4, 0, 19, 7, 8], device="cuda")
    ref_k, ref_v = ops.kv_cache_write_reference(k_cache, v_cache, key, value, rows, positions)
    ops.kv_cache_write(k_cache, v_cache, key, value, rows, positions)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kv_cache_write_out_of_range_is_skipped():
    """The CPU op raises for a row or position out of range; the CUDA op (no host sync) writes nothing for it."""
    k_cache = torch.zeros(2, 1, 4, 8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 8, device="cuda")
    ops.kv_cache_write(k_cache, v_cache, key, key, torch.tensor([1, 0, 2], device="cuda"),
                       torch.tensor([1, 4, 0], device="cuda"))
    assert k_cache[1, 0, 1].eq(1).all() and k_cache.sum().item() == 8 and v_cache.sum().item() == 8


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D,start", [(1, 9, 3, 64, 0), (1, 8, 1, 128, 700), (5, 6, 6, 32, 100),
                                              (37, 4, 2, 64, 3), (3, 32, 8, 128, 2000), (2, 2, 1, 80, 50)])
def test_attention(dtype, T, Hq, Hkv, D, start):
    """Tokens of two cache rows: a block at positions start.. in row 1, and one decode token in row 0."""
    B, S = 2, start + T + 5
    q, k_cache, v_cache = randn(T + 1, Hq, D, seed=9), randn(B, Hkv, S, D, seed=10), randn(B, Hkv, S, D, seed=11)
    rows = torch.tensor([1] * T + [0])
    positions = torch.cat([start + torch.arange(T), torch.tensor([S - 1])])
    scale = D**-0.5
    ref = ops.attention(q, k_cache, v_cache, rows, positions, scale)  # the CPU op, float32
    qc, kc, vc = (t.to("cuda", dtype) for t in (q, k_cache, v_cache))
    baseline = torch.empty_like(qc)  # the same math in dtype, token by token
    for t in range(T + 1):
        n, r = int(positions[t]) + 1, int(rows[t])
        k = kc[r, :, :n].repeat_interleave(Hq // Hkv, 0)  # [Hq, n, D]
        v = vc[r, :, :n].repeat_interleave(Hq // Hkv, 0)
        s = (qc[t][:, None, :] @ k.transpose(1, 2)) * scale  # [Hq, 1, n]
        baseline[t] = (torch.softmax(s, -1) @ v)[:, 0]
    out = ops.attention(qc, kc, vc, rows.cuda(), positions.cuda(), scale)
    check(out, ref, baseline)


# ---- linear


@pytest.mark.parametrize("xdtype", ALL_DTYPES)
@pytest.mark.parametrize("wdtype", ALL_DTYPES)
@pytest.mark.parametrize("T", [1, 2, 8, 9, 33, 64, 65, 130])
def test_linear(xdtype, wdtype, T):
    gen = torch.Generator().manual_seed(T)
    for K, N in [(576, 576), (1000, 37), (7, 5), (2048, 1536)]:
        x = torch.randn(T, K, generator=gen).to("cuda", xdtype)
        w = torch.randn(N, K, generator=gen).to("cuda", wdtype)
        out = ops.linear(x, w)
        assert out.shape == (T, N) and out.dtype == xdtype
        ref = x.double() @ w.double().T
        scale = (x.double().abs() @ w.double().abs().T).clamp_min(1.0)
        err = ((out.double() - ref).abs() / scale).max().item()
        if xdtype == torch.float32:
            assert err < 1e-5, f"relative error {err:.3g} (K={K}, N={N})"
        else:  # rounding of the output to a 16-bit type, as cuBLAS in that dtype does
            base = x @ w.to(xdtype).T
            base_err = ((base.double() - ref).abs() / scale).max().item()
            assert err <= 2 * base_err + 1e-6, f"error {err:.3g} vs baseline {base_err:.3g} (K={K}, N={N})"


@pytest.mark.parametrize("T", [1, 5, 40])
def test_linear_unaligned_and_strided_inputs(T):
    """Rows that are not 16-byte aligned (scalar path) and a strided input view give the same result."""
    x = randn(T, 577, seed=12).cuda()[:, 1:]  # [T, 576], row stride 577
    w = randn(300, 576, seed=13).cuda()
    ref = x.double() @ w.double().T
    for weight in (w, w.bfloat16()):
        torch.testing.assert_close(ops.linear(x, weight).double(), x.double() @ weight.double().T, rtol=1e-5,
                                   atol=1e-4)
    assert ops.linear(x, w).shape == ref.shape


# ---- sampling and acceptance: the CPU op's tokens, from the same seeds


@pytest.mark.parametrize("V", [7, 1000, 49152])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 1, 1.0), (1.3, 50, 1.0), (0.9, 0, 0.9),
                                                     (1.0, 20, 0.8), (1.0, 0, 1e-6), (2.0, 3000, 0.95)])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sampling_probs_and_sample_match_cpu(V, temperature, top_k, top_p, dtype):
    logits = randn(4, V, seed=V, scale=3.0).to(dtype)
    if dtype == torch.float16:  # no CPU op for float16: compare with the float32 op on the same values
        cpu_logits = logits.float()
    else:
        cpu_logits = logits
    probs = ops.sampling_probs(logits.cuda(), temperature, top_k, top_p).cpu()
    ref = ops.sampling_probs(cpu_logits, temperature, top_k, top_p)
    assert torch.equal(probs > 0, ref > 0), "kept sets differ"
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-7)
    for seed, offset in [(0, 0), (123, 17), (-5, 2**40)]:
        tokens = ops.sample(logits.cuda(), temperature, top_k, top_p, seed, offset).cpu()
        assert torch.equal(tokens, ops.sample(cpu_logits, temperature, top_k, top_p, seed, offset))


def test_per_token_parameters_match_cpu():
    """Each token its own temperature (0: greedy one-hot), top_k, top_p, seed and counter."""
    logits = randn(5, 3000, seed=15, scale=2.0)
    temperature, top_k, top_p = [0.0, 0.7, 1.0, 1.5, 0.0], [0, 10, 0, 200, 5], [1.0, 1.0, 0.8, 0.95, 0.5]
    seeds, counters = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 10, 20, 30, 40])
    probs = ops.sampling_probs(logits.cuda(), torch.tensor(temperature, device="cuda", dtype=torch.float64),
                               torch.tensor(top_k, device="cuda"), torch.tensor(top_p, device="cuda",
                                                                                dtype=torch.float64))
    ref = ops.sampling_probs(logits, temperature, top_k, top_p)
    assert torch.equal(probs.cpu() > 0, ref > 0)
    torch.testing.assert_close(probs.cpu(), ref, rtol=1e-5, atol=1e-7)
    tokens = ops.sample(logits.cuda(), torch.tensor(temperature, device="cuda", dtype=torch.float64),
                        torch.tensor(top_k, device="cuda"), torch.tensor(top_p, device="cuda", dtype=torch.float64),
                        seeds.cuda(), counters.cuda())
    assert torch.equal(tokens.cpu(), ops.sample(logits, temperature, top_k, top_p, seeds, counters))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_greedy_sample_first_maximum(dtype):
    logits = torch.zeros(3, 5000, dtype=dtype)
    logits[0, [7, 4000]] = 2.0  # tie: the lower index
    logits[1, 4999] = 1.0
    logits[2] = randn(5000, seed=14).to(dtype)
    out = ops.sample(logits.cuda(), 0.0, 0, 1.0, 0, 0).cpu()
    assert out.tolist()[:2] == [7, 4999]
    assert out[2].item() == logits[2].float().argmax().item()


@pytest.mark.parametrize("V", [1, 6, 1000, 49152])
def test_sample_from_probs_matches_cpu(V):
    probs = torch.rand(16, V, generator=torch.Generator().manual_seed(V))
    probs[probs < 0.3] = 0.0
    probs[:, 0] = 0.0 if V > 1 else 1.0
    for seed, offset in [(0, 0), (7, 100), (-3, 5), (2**62, 2**40)]:
        out = ops.sample_from_probs(probs.cuda(), seed, offset).cpu()
        assert torch.equal(out, ops.sample_from_probs(probs, seed, offset))


def test_sample_from_probs_invalid_rows():
    """The CPU op raises for these rows; the CUDA op reads bad entries as 0 and returns -1 for a massless row."""
    probs = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 2.0], [float("nan"), 1.0, 0.0], [0.0, float("inf"), 0.0]])
    assert ops.sample_from_probs(probs.cuda(), 0, 0).tolist() == [-1, 2, 1, -1]


@pytest.mark.parametrize("d", [0, 1, 4, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_speculative_accept_greedy_matches_cpu(d, dtype):
    gen = torch.Generator().manual_seed(d)
    V = 3000
    for trial in range(6):
        logits = torch.randn(d + 1, V, generator=gen).to(dtype).float()  # values exact in every dtype
        draft = logits[:d].argmax(-1)
        if d and trial % 2:
            draft[torch.randint(0, d, (1,), generator=gen)] = 5  # a mismatch somewhere (or not)
        tokens, n = ops.speculative_accept_greedy(draft.cuda(), logits.to("cuda", dtype))
        ref_tokens, ref_n = ops.speculative_accept_greedy(draft, logits)
        assert torch.equal(tokens.cpu(), ref_tokens) and n.item() == ref_n.item()


@pytest.mark.parametrize("V,d", [(5, 0), (6, 3), (1000, 5), (49152, 4)])
def test_speculative_accept_matches_cpu(V, d):
    gen = torch.Generator().manual_seed(V + d)
    for trial in range(10):
        q = torch.softmax(torch.randn(d, V, generator=gen) * 2, -1)
        p = torch.softmax(torch.randn(d + 1, V, generator=gen) * 2, -1)
        draft = torch.multinomial(q, 1, generator=gen)[:, 0] if d else torch.zeros(0, dtype=torch.int64)
        for seed in (trial, 2**40 + trial):
            tokens, n = ops.speculative_accept(draft.cuda(), q.cuda(), p.cuda(), seed, 3 * trial)
            ref_tokens, ref_n = ops.speculative_accept(draft, q, p, seed, 3 * trial)
            assert torch.equal(tokens.cpu(), ref_tokens) and n.item() == ref_n.item()


def test_speculative_accept_out_of_vocab_draft_is_rejected():
    """The CPU op raises for a draft token outside [0, V); the CUDA op rejects it and resamples."""
    q = torch.full((2, 4), 0.25, device="cuda")
    p = torch.full((3, 4), 0.25, device="cuda")
    tokens, n = ops.speculative_accept(torch.tensor([1, 9], device="cuda"), q, p, 0, 0)
    assert n.item() == 1 and tokens[0].item() == 1 and 0 <= tokens[1].item() < 4 and tokens[2].item() == -1


# ---- errors, graphs


def test_errors_name_the_op_and_argument():
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="rms_norm: weight must be on cuda"):
        ops.rms_norm(x, torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="linear: input .* disagree on K"):
        ops.linear(x, torch.randn(4, 63, device="cuda"))
    with pytest.raises(RuntimeError, match="silu_and_mul: input must be float32, float16 or bfloat16"):
        ops.silu_and_mul(x.double())
    cache = torch.randn(1, 1, 4, 32, device="cuda")
    with pytest.raises(RuntimeError, match=r"attention: rows must have shape \[2\]"):
        ops.attention(torch.randn(2, 2, 32, device="cuda"), cache, cache, torch.zeros(3, dtype=torch.int64,
                      device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="sample_from_probs: probs must be float32"):
        ops.sample_from_probs(torch.rand(2, 5, device="cuda").half(), 0, 0)
    with pytest.raises(RuntimeError, match="rms_norm: out must have shape"):
        torch.ops.layerskip.rms_norm(torch.empty(3, 64, device="cuda"), x, torch.ones(64, device="cuda"), 1e-5)


def _cuda(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda").to(dtype)


def _longs(*values):
    return torch.tensor(values, dtype=torch.int64, device="cuda")


def _doubles(*values):
    return torch.tensor(values, dtype=torch.float64, device="cuda")


@pytest.mark.parametrize("name,args", [
    ("rms_norm", lambda: (_cuda(3, 64), _cuda(3, 64), _cuda(64), 1e-5)),
    ("silu_and_mul", lambda: (_cuda(3, 32), _cuda(3, 64))),
    ("linear", lambda: (_cuda(3, 24), _cuda(3, 64), _cuda(24, 64, dtype=torch.bfloat16))),
    ("linear", lambda: (_cuda(3, 24, dtype=torch.bfloat16), _cuda(3, 64, dtype=torch.bfloat16), _cuda(24, 64))),
    ("attention", lambda: (_cuda(2, 4, 32), _cuda(2, 4, 32), _cuda(2, 2, 9, 32), _cuda(2, 2, 9, 32), _longs(1, 0),
                           _longs(3, 8), 0.2)),
    ("sampling_probs", lambda: (_cuda(2, 50), _cuda(2, 50), _doubles(0.8, 0.0), _longs(5, 0), _doubles(0.9, 1.0))),
    ("sample", lambda: (_longs(0, 0), _cuda(2, 50), _doubles(0.8, 0.0), _longs(5, 0), _doubles(0.9, 1.0),
                        _longs(1, 2), _longs(3, 4))),
])
def test_opcheck_cuda(name, args):
    torch.library.opcheck(getattr(torch.ops.layerskip, name).default, args())


@pytest.mark.parametrize("B,d", [(3, 4), (8, 2)])
def test_batched_acceptance_rows_match_batch_of_one(B, d):
    """Per-row draft lengths, seeds and counters: row b of a batch gives the tokens of a batch of one."""
    gen = torch.Generator().manual_seed(B)
    V = 500
    q = torch.softmax(torch.randn(B, d, V, generator=gen), -1)
    p = torch.softmax(torch.randn(B, d + 1, V, generator=gen), -1)
    logits = torch.randn(B, d + 1, V, generator=gen)
    draft = torch.multinomial(q.view(B * d, V), 1, generator=gen).view(B, d)
    lengths = torch.randint(0, d + 1, (B,), generator=gen)
    seeds, counters = torch.arange(B) * 7 + 1, torch.arange(B) * 100
    tokens, n = ops.speculative_accept(draft.cuda(), q.cuda(), p.cuda(), seeds.cuda(), counters.cuda(),
                                       draft_lengths=lengths.cuda())
    g_tokens, g_n = ops.speculative_accept_greedy(draft.cuda(), logits.cuda(), draft_lengths=lengths.cuda())
    for b in range(B):
        db = int(lengths[b])
        one, m = ops.speculative_accept(draft[b, :db], q[b, :db], p[b, : db + 1], int(seeds[b]), int(counters[b]))
        assert n[b].item() == m.item() and tokens[b, : db + 1].tolist() == one.tolist()
        assert (tokens[b, db + 1 :] == -1).all()
        one, m = ops.speculative_accept_greedy(draft[b, :db], logits[b, : db + 1])
        assert g_n[b].item() == m.item() and g_tokens[b, : db + 1].tolist() == one.tolist()


def test_a_decode_step_of_ops_replays_as_a_cuda_graph():
    """norm -> linear -> sample captured once and replayed on new inputs gives the eager tokens."""
    H, V = 256, 5000
    w_norm = torch.rand(H, device="cuda") + 0.5
    w_head = torch.randn(V, H, device="cuda").bfloat16()
    x = torch.randn(1, H, device="cuda")

    def step():
        return ops.sample(ops.linear(ops.rms_norm(x, w_norm, 1e-5), w_head), 0.8, 40, 0.9, 11, 3)

    step()  # warm-up outside the capture (allocator pools, lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(5):
        x.copy_(torch.randn(1, H, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        assert captured.item() == step().item()
