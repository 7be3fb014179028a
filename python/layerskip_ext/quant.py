"""Packed GGUF weight blocks (Q8_0, Q4_0, Q4_1) in memory: PackedWeight, our quantizers, and dequantization.

A PackedWeight holds a matrix [N, K] as the bytes of its blocks, N rows of K / 32 blocks (a view of the
memory-mapped GGUF file, or the output of `quantize`), and is computed with by the C++ op
torch.ops.layerskip.linear_quantized without ever being widened in memory. Block layouts (GGUF / ggml):
    Q8_0: fp16 d, int8 q[32]               w = d * q                 34 bytes per 32 weights
    Q4_0: fp16 d, 16 bytes of nibbles      w = d * (nibble - 8)      18
    Q4_1: fp16 d, fp16 m, 16 bytes         w = d * nibble + m        20
where weight i < 16 of a block is the low nibble of byte i and weight 16 + i its high nibble.
The quantizers follow ggml's reference rounding, so they write the same bytes as gguf.quants.quantize.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LayerSkipError

BLOCK = 32  # weights per block, every format
# name -> (GGUF GGMLQuantizationType number, bytes per block)
FORMATS = {"q8_0": (8, 34), "q4_0": (2, 18), "q4_1": (3, 20)}
FORMAT_NAMES = {number: name for name, (number, _) in FORMATS.items()}


def row_bytes(fmt: str, in_features: int) -> int:
    """Bytes of one packed row of `in_features` weights."""
    return in_features // BLOCK * FORMATS[fmt][1]


@dataclass
class PackedWeight:
    """A [out_features, in_features] matrix kept as packed blocks: data [out_features, row bytes] uint8."""

    data: torch.Tensor
    fmt: str
    out_features: int
    in_features: int
    # the read-only memory map of the file that `data` is a view of (None: data owns its memory); the engine
    # releases its pages once it holds its own interleaved copy (engine.release_file_pages)
    file_map: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise LayerSkipError(f"unsupported packed format {self.fmt!r}; expected one of {sorted(FORMATS)}")
        if self.in_features % BLOCK:
            raise LayerSkipError(f"in_features {self.in_features} is not a multiple of the block size {BLOCK}")
        expected = (self.out_features, row_bytes(self.fmt, self.in_features))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise LayerSkipError(f"packed {self.fmt} data must be uint8 {expected}, got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def format_id(self) -> int:
        """The GGUF type number the C++ ops take."""
        return FORMATS[self.fmt][0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [out_features, in_features]."""
        return dequantize(self.data, self.fmt, self.in_features).to(dtype)

    def permute_rows(self, index: torch.Tensor) -> "PackedWeight":
        """The matrix with rows reordered by `index` (rows are independent blocks: a row gather)."""
        rows = self.data.numpy()[index.numpy()]  # numpy's gather: torch's parallel index_select stalls on a busy CPU
        return PackedWeight(torch.from_numpy(rows), self.fmt, self.out_features, self.in_features)


# ----------------------------------------------------------------------------------------------
# quantizers: float [N, K] -> packed bytes [N, K / 32 * block bytes], ggml's reference rounding


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (C roundf), as ggml's Q8_0 quantizer."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """float [..., 1] -> its float16 bytes [..., 2] uint8 (little endian)."""
    return v.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [B, 32] in [0, 15] -> [B, 16] uint8: byte i = q[i] | q[16 + i] << 4."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def quantize(weight: torch.Tensor, fmt: str) -> PackedWeight:
    """weight [N, K] (K a multiple of 32, any float dtype) -> PackedWeight in `fmt` (q8_0, q4_0 or q4_1)."""
    if fmt not in FORMATS:
        raise LayerSkipError(f"unsupported format {fmt!r}; expected one of {sorted(FORMATS)}")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise LayerSkipError(f"quantize: weight must be [N, K] with K a multiple of {BLOCK}, got {tuple(weight.shape)}")
    N, K = weight.shape
    blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)  # [B, 32], B = N * K / 32
    if fmt == "q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127  # [B, 1]
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_away(blocks * inv).to(torch.int8).view(torch.uint8)  # [B, 32]
        packed = torch.cat([_half_bytes(d), q], dim=1)
    elif fmt == "q4_0":
        idx = blocks.abs().argmax(dim=1, keepdim=True)
        d = blocks.gather(1, idx) / -8  # the value of largest magnitude maps to -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inv + 8.5).clamp(0, 15)  # [B, 32]
        packed = torch.cat([_half_bytes(d), _pack_nibbles(q)], dim=1)
    else:  # q4_1
        lo = blocks.amin(dim=1, keepdim=True)
        d = (blocks.amax(dim=1, keepdim=True) - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((blocks - lo) * inv + 0.5).clamp(0, 15)  # [B, 32]
        packed = torch.cat([_half_bytes(d), _half_bytes(lo), _pack_nibbles(q)], dim=1)
    return PackedWeight(packed.reshape(N, row_bytes(fmt, K)).contiguous(), fmt, N, K)


def dequantize(data: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """Packed bytes [N, row bytes] uint8 -> float32 [N, in_features] (pure PyTorch)."""
    N = data.shape[0]
    blocks = data.reshape(-1, FORMATS[fmt][1])  # [B, block bytes]
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # [B, 1]
    if fmt == "q8_0":
        values = d * blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = blocks[:, 4:] if fmt == "q4_1" else blocks[:, 2:]  # [B, 16]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # [B, 32]
        if fmt == "q4_0":
            values = d * (q - 8)
        else:
            values = d * q + blocks[:, 2:4].contiguous().view(torch.float16).float()
    return values.reshape(N, in_features)


# ----------------------------------------------------------------------------------------------
# the reference model computing with packed weights (accuracy checks: logits, perplexity)


class PackedLinear(torch.nn.Module):
    """nn.Linear without bias whose weight stays packed: forward runs torch.ops.layerskip.linear_quantized
    (the engine's kernel: input rows rounded per block of 32 to int8)."""

    def __init__(self, weight: PackedWeight):
        super().__init__()
        self.weight_packed = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        from . import ops
        w = self.weight_packed
        out = ops.linear_quantized(x.reshape(-1, w.in_features).float(), w.data, w.format_id, w.out_features,
                                   w.in_features)  # [rows, N]
        return out.reshape(*x.shape[:-1], w.out_features)


def packed_module(model):
    """A copy of model.module (the float reference, dequantized weights) whose matmuls run on the model's
    packed weights: the logits the quantized engine computes, through the pure-PyTorch forward."""
    import copy
    module = copy.deepcopy(model.module)
    for name, w in model.weights.items():
        if isinstance(w, PackedWeight) and name != "model.embed_tokens.weight":
            parent, _, attr = name.removesuffix(".weight").rpartition(".")
            setattr(module.get_submodule(parent), attr, PackedLinear(w))
    if model.config.tie_word_embeddings and isinstance(model.weights["model.embed_tokens.weight"], PackedWeight):
        module.lm_head = PackedLinear(model.weights["model.embed_tokens.weight"])
    return module
