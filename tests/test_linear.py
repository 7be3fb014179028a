"""torch.ops.layerskip.linear against a float64 PyTorch reference: T on both sides of the skinny-kernel
limit (64), K with and without a vector tail, N not a multiple of the row block, fp32, bf16 and fp16 weights,
non-contiguous inputs, batch invariance (bit for bit, every SIMD kernel this CPU has, forced in turn), error
messages, and opcheck."""
import pytest
import torch

import layerskip_ext._C  # noqa: F401  (registers torch.ops.layerskip.*)
from layerskip_ext import ops

_linear = torch.ops.layerskip.linear


def linear(x, w):
    """The op with an output allocated here: [T, N] float32."""
    out = torch.empty((x.shape[0] if x.dim() == 2 else 0, w.shape[0] if w.dim() == 2 else 0))
    _linear.default(out, x, w)
    return out


TOKENS = list(range(1, 18)) + [33, 64, 65, 90]
WDTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    ops.set_linear_kernel("auto")
KS = [7, 64, 576, 1536, 1000]
NS = [1, 5, 192, 576, 1000]


def reference(x, w):
    """x [T, K], w [N, K] (any float dtype) -> x @ w.T in float64, [T, N]; x rounded to bf16 first where the
    kernel in use does so for bf16 weights (avx512bf16)."""
    if w.dtype == torch.bfloat16 and ops.linear_rounds_bf16_inputs():
        x = x.bfloat16()
    return x.double() @ w.double().T


def check(out, x, w):
    ref = reference(x, w)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # fp32 accumulation of K products: scale the tolerance with the size of the terms summed
    scale = (x.double().abs() @ w.double().abs().T).clamp_min(1.0)
    err = ((out.double() - ref).abs() / scale).max().item()
    assert err < 1e-5, f"relative error {err:.3g}"


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("t", TOKENS)
def test_matches_reference(t, wdtype):
    gen = torch.Generator().manual_seed(t)
    for k in KS:
        for n in NS:
            x = torch.randn(t, k, generator=gen)  # [T, K]
            w = torch.randn(n, k, generator=gen).to(wdtype)  # [N, K]
            check(linear(x, w), x, w)


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_lm_head_shape(wdtype):
    """A wide weight split across threads (SmolLM2's LM head shape, fewer rows)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 576, generator=gen)  # [T, K]
    w = torch.randn(8191, 576, generator=gen).to(wdtype)  # [N, K]
    check(linear(x, w), x, w)


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_batch_invariance(wdtype):
    """Up to 64 rows, each output row is bit for bit the row computed alone or in any other batch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 576, generator=gen)
    w = torch.randn(700, 576, generator=gen).to(wdtype)
    full = linear(x, w)
    for t in (0, 1, 9, 31, 63):
        assert torch.equal(linear(x[t:t + 1], w)[0], full[t])
        assert torch.equal(linear(x[t // 2:], w)[t - t // 2], full[t])


KERNEL_KS = [1, 7, 15, 16, 17, 33, 100, 576]  # none, some or all of K in the 8- / 16-lane body
KERNEL_NS = [1, 3, 5, 13, 37]  # not multiples of the row blocks (4) nor of each other


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("kernel", ops.linear_kernels())
def test_kernel_matches_reference_and_is_row_invariant(kernel, wdtype):
    """Each kernel this CPU runs, forced: close to float64, and every row of a call with T = 1..64 rows equal
    bit for bit to the row computed alone, whatever rows come before and after it (T changes the passes,
    the rows per block and whether 16-bit weights are widened into a scratch copy)."""
    ops.set_linear_kernel(kernel)
    assert ops.linear_kernel() == kernel
    gen = torch.Generator().manual_seed(11)
    for k in KERNEL_KS:
        for n in KERNEL_NS:
            x = torch.randn(64, k, generator=gen)  # [64, K]
            w = torch.randn(n, k, generator=gen).to(wdtype)  # [N, K]
            alone = torch.cat([linear(x[t:t + 1], w) for t in range(64)])  # [64, N], one row per call
            check(alone, x, w)
            for t in range(1, 65):
                first = (t * 7) % (65 - t)  # a varying window of t rows
                got = linear(x[first:first + t], w)
                assert torch.equal(got, alone[first:first + t]), (kernel, k, n, t)


@pytest.mark.parametrize("kernel", ops.linear_kernels())
def test_kernel_threads_and_wide_weights(kernel):
    """A weight split across threads at row counts that are not multiples of the row block: the same bits as
    the rows computed alone."""
    ops.set_linear_kernel(kernel)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(24, 200, generator=gen)  # [T, K]
    for wdtype in WDTYPES:
        w = torch.randn(4099, 200, generator=gen).to(wdtype)  # [N, K]
        full = linear(x, w)
        check(full, x, w)
        for t in (0, 5, 23):
            assert torch.equal(linear(x[t:t + 1], w)[0], full[t])


@pytest.mark.skipif("avx512bf16" not in ops.linear_kernels(), reason="CPU without AVX512_BF16")
def test_bf16_dot_kernel_rounds_inputs_at_every_t():
    """avx512bf16 with bf16 weights: the input rounded to bf16 (inputs that bf16 holds give the avx512 kernel's
    float32-activation result within float32 rounding; others differ by about bf16's precision), prefill
    (T > 64) included, each row the same bits as alone; float32 weights: the avx512 kernel's bits."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(150, 300, generator=gen)  # [T, K], T past the skinny limit
    w = torch.randn(70, 300, generator=gen)  # [N, K]
    wb = w.bfloat16()
    ops.set_linear_kernel("avx512")
    wide, wide_f32 = linear(x, wb), linear(x[:40], w)
    wide_rounded = linear(x.bfloat16().float(), wb)
    ops.set_linear_kernel("avx512bf16")
    dot = linear(x, wb)
    check(dot, x, wb)
    scale = (x.double().abs() @ wb.double().abs().T).max().item()
    assert (dot - wide).abs().max().item() > 1e-4 * scale  # the rounding shows
    assert (dot - wide_rounded).abs().max().item() < 1e-5 * scale  # and is the only difference
    for t in (0, 63, 64, 149):
        assert torch.equal(linear(x[t:t + 1], wb)[0], dot[t])
    assert torch.equal(linear(x[:40], w), wide_f32)


def test_kernel_selection_errors():
    assert ops.linear_kernels()[-1] == "plain"
    with pytest.raises(RuntimeError, match="unknown linear kernel 'avx9'"):
        ops.set_linear_kernel("avx9")
    ops.set_linear_kernel("auto")
    assert ops.linear_kernel() == ops.linear_kernels()[0]


@pytest.mark.parametrize("t", [4, 20, 70])
def test_non_contiguous(t):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, t, generator=gen).T  # [T, 64], stride (1, T)
    w = torch.randn(40, 128, generator=gen)[:, ::2]  # [40, 64], row stride 128
    assert not x.is_contiguous() and not w.is_contiguous()
    check(linear(x, w), x, w)
    check(linear(x, w.bfloat16()), x, w.bfloat16())
    check(linear(x, w.half()), x, w.half())


@pytest.mark.parametrize("t", [0, 3, 20])
def test_empty(t):
    assert linear(torch.randn(t, 8), torch.randn(0, 8)).shape == (t, 0)  # N = 0
    out = linear(torch.randn(t, 0), torch.randn(5, 0))  # K = 0: all zeros
    assert out.shape == (t, 5) and bool((out == 0).all())


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.randn(8), torch.randn(4, 8), "input \\[T, K\\] must have 2 dimensions"),
        (torch.randn(1, 2, 8), torch.randn(4, 8), "input \\[T, K\\] must have 2 dimensions"),
        (torch.randn(2, 8), torch.randn(8), "weight \\[N, K\\] must have 2 dimensions"),
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), "input must be float32"),
        (torch.randn(2, 8).bfloat16(), torch.randn(4, 8), "input must be float32"),
        (torch.randn(2, 8), torch.randn(4, 8).double(), "weight must be float32, bfloat16 or float16"),
        (torch.randn(2, 8), torch.randint(0, 3, (4, 8)), "weight must be float32, bfloat16 or float16"),
        (torch.randn(2, 8), torch.randn(4, 9), "disagree on K"),
        (torch.randn(70, 8), torch.randn(4, 9), "disagree on K"),  # also on the ATen path
    ],
)
def test_errors(x, w, message):
    with pytest.raises(RuntimeError, match=message):
        linear(x, w)


def _ops_module():
    try:
        import layerskip_ext.ops as ops
    except ImportError:
        return None
    return ops


def test_out_errors():
    with pytest.raises(RuntimeError, match=r"linear: out \[T, N\] must have shape \[2, 4\]"):
        _linear.default(torch.empty(2, 5), torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"linear: out \[T, N\] must be contiguous"):
        _linear.default(torch.empty(4, 2).T, torch.randn(2, 8), torch.randn(4, 8))


@pytest.mark.parametrize("t", [1, 8, 17, 70])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_opcheck(t, wdtype):
    if _ops_module() is None:
        pytest.skip("layerskip_ext.ops (register_fake for linear) not available in this checkout")
    x = torch.randn(t, 64)
    w = torch.randn(24, 64).to(wdtype)
    torch.library.opcheck(_linear.default, (torch.empty(t, 24), x, w))
