"""Packed GGUF blocks interleaved by 16 rows (ops.interleave_quantized, format 1000 + the GGUF one; the engine's
decode layout, csrc/cpu/quant_interleave.h): every kernel this CPU runs, forced in turn, against the float
matmul on the `gguf` package's dequantization within the activation rounding bound, against the plain C++
kernel to the last bit, and batch invariant (each input row alone gives the bits of the whole batch);
dequantize_rows reads the interleaved rows back as gguf dequantizes them; errors; opcheck."""
import numpy as np
import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.quant import FORMATS
from test_quant_linear import ACTIVATIONS, gguf_packed, rounding_bound

KS = [32, 96, 800, 1536]  # 96, 800: not multiples of 256
NS = [1, 7, 16, 17, 33]   # inside one group, a whole group, a group and one row
TOKENS = [1, 2, 3, 4, 5, 8, 9, 17, 64]


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    ops.set_quant_kernel("auto")
    ops.set_quant_activations("int8x2")


def interleaved(w: torch.Tensor, fmt: str):
    """w [N, K] -> (interleaved bytes, format id, gguf's dequantization [N, K], gguf's packed bytes)."""
    packed, w_deq = gguf_packed(w, fmt)
    fmt_id = FORMATS[fmt][0]
    il = ops.interleave_quantized(packed, fmt_id, w.shape[0], w.shape[1])
    return il, ops.INTERLEAVED + fmt_id, w_deq, packed


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kernel", ops.quant_kernels())
def test_matches_gguf_dequantization(kernel, fmt, activations):
    ops.set_quant_kernel(kernel)
    ops.set_quant_activations(activations)
    gen = torch.Generator().manual_seed(11)
    for k in KS:
        for n in NS:
            il, fmt_id, w_deq, packed = interleaved(torch.randn(n, k, generator=gen), fmt)
            for t in (1, 9):
                x = torch.randn(t, k, generator=gen) * 2  # [T, K]
                out = ops.linear_quantized(x, il, fmt_id, n, k)  # [T, N]
                err = (out.double() - x.double() @ torch.from_numpy(w_deq).double().T).abs()
                bound = rounding_bound(x, w_deq, packed, fmt, activations)
                assert out.shape == (t, n)
                assert bool((err <= bound).all()), f"{kernel} {fmt} T={t} K={k} N={n}: error {err.max():.3g}"


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_simd_kernels_equal_plain_bit_for_bit_and_batch_invariant(fmt, activations):
    """The interleaved kernels and the plain path do the same float operations in the same order per output."""
    ops.set_quant_activations(activations)
    gen = torch.Generator().manual_seed(12)
    for k, n in [(96, 33), (1536, 65)]:
        il, fmt_id, _, _ = interleaved(torch.randn(n, k, generator=gen), fmt)
        x = torch.randn(max(TOKENS), k, generator=gen)
        ops.set_quant_kernel("plain")
        plain = ops.linear_quantized(x, il, fmt_id, n, k)  # [64, N]
        for kernel in ops.quant_kernels():
            ops.set_quant_kernel(kernel)
            for t in TOKENS:
                out = ops.linear_quantized(x[:t], il, fmt_id, n, k)
                assert torch.equal(out, plain[:t]), f"{kernel} T={t} K={k} N={n}"
            alone = torch.cat([ops.linear_quantized(x[t:t + 1], il, fmt_id, n, k) for t in range(x.shape[0])])
            assert torch.equal(alone, plain), kernel


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_zero_activations_and_extreme_codes(fmt):
    """All-zero input blocks (scale 0) give 0; Q8_0's -128 and the Q4 codes at both ends go through the offsets
    (Q8_0's codes are stored + 128, Q4_0's nibbles - 8 applied in int32)."""
    k, n = 64, 18
    w = torch.randn(n, k)
    w[0] = torch.linspace(-3, 3, k)
    packed, w_deq = gguf_packed(w, fmt)
    if fmt == "q8_0":
        packed = packed.clone()
        packed[1, 2:34] = 0x80  # codes -128 with d = 1.0
        packed[1, 0:2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)
        w_deq = w_deq.copy()
        w_deq[1, :32] = -128.0
    fmt_id = FORMATS[fmt][0]
    il = ops.interleave_quantized(packed, fmt_id, n, k)
    x = torch.zeros(2, k)
    x[1] = torch.linspace(-1, 1, k)
    for kernel in ops.quant_kernels():
        ops.set_quant_kernel(kernel)
        out = ops.linear_quantized(x, il, ops.INTERLEAVED + fmt_id, n, k)
        assert (out[0] == 0).all()
        ref = x[1].double() @ torch.from_numpy(w_deq).double().T
        bound = rounding_bound(x[1:], w_deq, packed, fmt, "int8x2")[0]
        assert ((out[1].double() - ref).abs() <= bound).all(), kernel


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_rows_reads_interleaved_rows_as_gguf(fmt):
    gen = torch.Generator().manual_seed(13)
    il, fmt_id, w_deq, packed = interleaved(torch.randn(35, 96, generator=gen), fmt)
    assert il.dim() == 1 and il.numel() == 48 * packed.shape[1]  # 35 rows padded to 3 groups of 16
    ids = torch.tensor([34, 0, 15, 16, 34])
    out = ops.dequantize_rows(il, fmt_id, 35, 96, ids)
    np.testing.assert_array_equal(out.numpy(), w_deq[ids.numpy()])


def test_errors_and_opcheck():
    il, fmt_id, _, packed = interleaved(torch.randn(20, 64), "q4_0")
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="already interleaved"):
        ops.interleave_quantized(il, fmt_id, 20, 64)
    with pytest.raises(RuntimeError, match=r"a \[20, 64\] Q4_0 interleaved matrix takes 1152"):
        ops.linear_quantized(x, il[:-1], fmt_id, 20, 64)
    with pytest.raises(RuntimeError, match="interleaved weights must be 1-D"):
        ops.linear_quantized(x, il.view(32, 36), fmt_id, 20, 64)
    with pytest.raises(RuntimeError, match="unsupported block format 1012"):
        ops.linear_quantized(x, il, 1012, 20, 64)
    torch.library.opcheck(torch.ops.layerskip.interleave_quantized.default, (packed, 2, 20, 64))
    torch.library.opcheck(torch.ops.layerskip.linear_quantized.default, (x, il, fmt_id, 20, 64))
    torch.library.opcheck(torch.ops.layerskip.dequantize_rows.default, (il, fmt_id, 20, 64, torch.tensor([19, 3])))
