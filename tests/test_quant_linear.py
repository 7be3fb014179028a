"""torch.ops.layerskip.linear_quantized / dequantize_rows on packed GGUF blocks (Q8_0, Q4_0, Q4_1), with the
`gguf` package as the oracle: every kernel this CPU runs (forced in turn) against the float matmul on
gguf's own dequantization, within the bound the rounding of the activations allows (int8, or two-level
int8x2), and against the plain C++ kernel; our quantizers against gguf.quants.quantize, byte for byte;
error messages; opcheck."""
import gguf
import numpy as np
import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.quant import BLOCK, FORMATS, PackedWeight, dequantize, quantize

GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "q4_1": gguf.GGMLQuantizationType.Q4_1}
TOKENS = [1, 2, 3, 7, 8, 9, 16, 17, 31, 64]
KS = [32, 96, 800, 1536]  # 96 and 800: not multiples of 256 (nor of a 64-byte pair of blocks)
NS = [1, 7, 33]


ACTIVATIONS = ["int8x2", "int8"]


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    ops.set_quant_kernel("auto")
    ops.set_quant_activations("int8x2")


def gguf_packed(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, np.ndarray]:
    """w [N, K] -> (gguf's packed bytes [N, row bytes] as a tensor, gguf's dequantization [N, K])."""
    packed = gguf.quants.quantize(w.numpy(), GGUF_TYPES[fmt])
    return torch.from_numpy(packed.copy()), gguf.quants.dequantize(packed, GGUF_TYPES[fmt])


def rounding_bound(x: torch.Tensor, w_deq: np.ndarray, packed: torch.Tensor, fmt: str,
                   activations: str = "int8") -> torch.Tensor:
    """[T, N] bound on |linear_quantized - x @ w.T| from rounding x per block to int8 (|error| <= scale/2 per
    value, scale = max|x| / 127; two levels: the residual rounded again with scale / 256 and clamped to
    127 codes, which in a tie costs a whole step, scale / 256, instead of half of one), plus float32
    summation slack. The Q4_1 min term uses the exact sum of x, so only the d * nibble part of its weights
    sees the rounding."""
    T, K = x.shape
    scale = x.reshape(T, K // BLOCK, BLOCK).abs().amax(dim=2).double() / 127  # [T, B]
    if activations == "int8x2":
        scale = scale / 128  # 0.5 * scale / 128 = one step of the residual's scale / 256
    codes = torch.from_numpy(w_deq).double()  # [N, K]
    if fmt == "q4_1":  # d * nibble = w - m
        mins = packed.reshape(-1, 20)[:, 2:4].contiguous().view(torch.float16).double()  # [N * B, 1]
        codes = (codes.reshape(-1, BLOCK) - mins).reshape(codes.shape)
    code_mass = codes.abs().reshape(codes.shape[0], K // BLOCK, BLOCK).sum(dim=2)  # [N, B]
    bound = 0.5 * scale @ code_mass.T  # [T, N]
    slack = 1e-5 * (x.double().abs() @ torch.from_numpy(w_deq).double().abs().T)
    return bound * (1 + 1e-6) + slack + 1e-6


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kernel", ops.quant_kernels())
def test_matches_gguf_dequantization(kernel, fmt, activations):
    ops.set_quant_kernel(kernel)
    ops.set_quant_activations(activations)
    assert ops.quant_kernel() == kernel and ops.quant_activations() == activations
    gen = torch.Generator().manual_seed(1)
    fmt_id = FORMATS[fmt][0]
    err_total = bound_total = 0.0
    for k in KS:
        for n in NS:
            w = torch.randn(n, k, generator=gen)  # [N, K]
            packed, w_deq = gguf_packed(w, fmt)
            for t in TOKENS:
                x = torch.randn(t, k, generator=gen) * torch.rand(t, 1, generator=gen) * 3  # [T, K]
                out = ops.linear_quantized(x, packed, fmt_id, n, k)  # [T, N]
                ref = x.double() @ torch.from_numpy(w_deq).double().T
                err = (out.double() - ref).abs()
                bound = rounding_bound(x, w_deq, packed, fmt, activations)
                assert out.shape == (t, n) and out.dtype == torch.float32
                assert bool((err <= bound).all()), (
                    f"{kernel} {fmt} T={t} K={k} N={n}: error {err.max():.3g} above the rounding bound "
                    f"{bound.flatten()[err.flatten().argmax()]:.3g}")
                err_total += err.sum().item()
                bound_total += bound.sum().item()
    # the rounding errors are random and partly cancel: over the grid, far below the worst case
    assert err_total < 0.2 * bound_total


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_simd_kernels_equal_plain(fmt, activations):
    """Same int32 block sums, so a SIMD kernel differs from the plain one only by float summation order."""
    ops.set_quant_activations(activations)
    gen = torch.Generator().manual_seed(2)
    k, n = 1536, 65
    w = quantize(torch.randn(n, k, generator=gen), fmt)
    for t in [1, 5, 16, 40, 64]:
        x = torch.randn(t, k, generator=gen)
        ops.set_quant_kernel("plain")
        plain = ops.linear_quantized(x, w.data, w.format_id, n, k)
        scale = x.abs() @ w.dequantize().abs().T  # [T, N]
        for kernel in ops.quant_kernels():
            ops.set_quant_kernel(kernel)
            out = ops.linear_quantized(x, w.data, w.format_id, n, k)
            assert ((out - plain).abs() <= 1e-5 * scale + 1e-6).all(), kernel


def test_zero_and_extreme_blocks():
    """All-zero activation blocks (scale 0), Q8_0 codes of -128, Q4 codes at both ends."""
    k, n = 64, 3
    w = torch.zeros(n, k)
    w[0, :32] = 1.0
    w[0, 5] = -1.0
    w[1] = torch.linspace(-2, 2, k)
    packed = quantize(w, "q8_0").data.clone()
    packed[2, 2:34] = 0x80  # int8 -128 with d = 0 stays 0; set d = 1.0 (fp16 0x3c00)
    packed[2, 0:2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)
    x = torch.zeros(2, k)
    x[1] = torch.linspace(-1, 1, k)
    x[1, :32] = 0.5
    w_deq = dequantize(packed, "q8_0", k)
    for kernel in ops.quant_kernels():
        ops.set_quant_kernel(kernel)
        out = ops.linear_quantized(x, packed, 8, n, k)
        assert (out[0] == 0).all()
        torch.testing.assert_close(out[1], (x[1:] @ w_deq.T)[0], rtol=1e-2, atol=1e-2)
    for fmt in ("q4_0", "q4_1"):
        pw = quantize(w, fmt)
        for kernel in ops.quant_kernels():
            ops.set_quant_kernel(kernel)
            out = ops.linear_quantized(x, pw.data, pw.format_id, n, k)
            torch.testing.assert_close(out, x @ pw.dequantize().T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_gives_non_finite_row(bad, activations):
    """A NaN or infinity in an input row makes that row's outputs NaN (as a float matmul's are not finite), in both
    layouts and every kernel and format, and leaves the other rows' values as they are alone (the engine stops a
    row whose logits are not finite; before, the int8 rounding turned a NaN into finite garbage for Q8_0/Q4_0)."""
    ops.set_quant_activations(activations)
    gen = torch.Generator().manual_seed(5)
    k, n = 96, 33
    x = torch.randn(3, k, generator=gen)
    x[1, 40] = bad
    for fmt, (fmt_id, _) in sorted(FORMATS.items()):
        pw = quantize(torch.randn(n, k, generator=gen), fmt)
        il = ops.interleave_quantized(pw.data, fmt_id, n, k)
        for data, fid in ((pw.data, fmt_id), (il, ops.INTERLEAVED + fmt_id)):
            for kernel in ops.quant_kernels():
                ops.set_quant_kernel(kernel)
                out = ops.linear_quantized(x, data, fid, n, k)  # [3, N]
                assert torch.isnan(out[1]).all(), (fmt, fid, kernel)
                for r in (0, 2):
                    assert torch.equal(out[r], ops.linear_quantized(x[r:r + 1], data, fid, n, k)[0])
                    assert torch.isfinite(out[r]).all()


def test_out_variant_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(10, 64, generator=gen), "q4_1")
    x = torch.randn(64, 4, generator=gen).T  # [4, 64], not contiguous
    out = torch.full((4, 10), float("nan"))
    res = ops.linear_quantized(x, w.data, w.format_id, 10, 64, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ops.linear_quantized(x.contiguous(), w.data, w.format_id, 10, 64))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantizers_write_gguf_bytes(fmt):
    """Ours == gguf.quants.quantize byte for byte; the round trip error is within half a step."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(9, 224, generator=gen) * torch.rand(9, 1, generator=gen)
    w[0, :32] = 0  # an all-zero block
    w[1, 32:64] = 0.25  # a constant block
    ours = quantize(w, fmt)
    ref = gguf.quants.quantize(w.numpy(), GGUF_TYPES[fmt])
    assert ours.data.shape == ref.shape and bool((ours.data.numpy() == ref).all())
    deq = ours.dequantize()
    np.testing.assert_array_equal(deq.numpy(), gguf.quants.dequantize(ref, GGUF_TYPES[fmt]))
    blocks = w.reshape(-1, BLOCK)
    spread = blocks.abs().amax(1) if fmt != "q4_1" else blocks.amax(1) - blocks.amin(1)
    step = spread / {"q8_0": 127, "q4_0": 8, "q4_1": 15}[fmt]  # [B]
    err = (deq - w).reshape(-1, BLOCK).abs().amax(1)
    # half a step (a whole one for Q4_0, whose codes -8..7 reach only 7/8 of the opposite extreme), plus the
    # float16 rounding of d (and m) times the largest code
    half = 1.0 if fmt == "q4_0" else 0.5
    assert (err <= step * (half + 128 * 2.0 ** -11) + blocks.abs().amax(1) * 2.0 ** -10 + 1e-7).all()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_rows_matches_gguf(fmt):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(11, 96, generator=gen)
    packed, w_deq = gguf_packed(w, fmt)
    ids = torch.tensor([3, 0, 10, 3])
    out = ops.dequantize_rows(packed, FORMATS[fmt][0], 11, 96, ids)
    np.testing.assert_array_equal(out.numpy(), w_deq[ids.numpy()])


def test_errors():
    w = quantize(torch.randn(4, 64), "q8_0")
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="packed weights hold 271 bytes; a \\[4, 64\\] Q8_0 matrix takes 272"):
        ops.linear_quantized(x, w.data.flatten()[:-1], 8, 4, 64)
    with pytest.raises(RuntimeError, match="not a multiple of the block size 32"):
        ops.linear_quantized(torch.randn(2, 48), w.data, 8, 4, 48)
    with pytest.raises(RuntimeError, match="unsupported block format 12"):
        ops.linear_quantized(x, w.data, 12, 4, 64)
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.linear_quantized(x.double(), w.data, 8, 4, 64)
    with pytest.raises(RuntimeError, match=r"input must be \[T, 64\]"):
        ops.linear_quantized(torch.randn(2, 32), w.data, 8, 4, 64)
    with pytest.raises(RuntimeError, match="must be uint8"):
        ops.linear_quantized(x, w.data.to(torch.int8), 8, 4, 64)
    with pytest.raises(RuntimeError, match="out must be a float32"):
        ops.linear_quantized(x, w.data, 8, 4, 64, out=torch.empty(2, 5))
    with pytest.raises(RuntimeError, match="id 4 at position 1 is out of range"):
        ops.dequantize_rows(w.data, 8, 4, 64, torch.tensor([0, 4]))
    empty = torch.empty(0, dtype=torch.uint8)  # byte counts that wrap int64 to 0 (crashed in the kernels before)
    for fmt_id in (8, ops.INTERLEAVED + 8):
        with pytest.raises(RuntimeError, match="too large"):
            ops.dequantize_rows(empty, fmt_id, 2 ** 43, 32 * 2 ** 20, torch.tensor([5]))
    with pytest.raises(RuntimeError, match="too large"):
        ops.interleave_quantized(empty, 8, 2 ** 43, 32 * 2 ** 20)
    with pytest.raises(RuntimeError, match="too large"):
        ops.interleave_quantized(empty, 8, 2 ** 62, 32)
    with pytest.raises(RuntimeError, match="unknown quant kernel 'sse'"):
        ops.set_quant_kernel("sse")
    with pytest.raises(RuntimeError, match="unknown quant activation mode 'int4'"):
        ops.set_quant_activations("int4")
    with pytest.raises(ValueError, match="unsupported packed format"):
        PackedWeight(w.data, "q5_0", 4, 64)


def test_opcheck():
    w = quantize(torch.randn(6, 64), "q4_0")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.layerskip.linear_quantized.default, (x, w.data, 2, 6, 64))
    torch.library.opcheck(torch.ops.layerskip.dequantize_rows.default, (w.data, 2, 6, 64, torch.tensor([1, 5])))
