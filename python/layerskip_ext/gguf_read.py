"""A fast, memory-mapped GGUF reader: metadata as Python values, tensors as numpy views of the map.

gguf.GGUFReader builds a numpy view per metadata item (30 s for the 49152 tokens and merges of SmolLM2 on a
busy machine); this reads the same file format (GGUF v2 / v3, little endian) with `struct` in well under a
second, and checks each tensor against the file: its type, that its rows are whole blocks, and that its
data starts on the file's alignment and lies inside the file, naming the tensor when one is not.

    f = GGUFFile(path)
    f.fields["llama.block_count"]           # 30
    t = f.tensors[0]; t.name, t.tensor_type, t.shape, t.data   # shape innermost first, as GGUF lists it
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass

import numpy as np

# GGUF metadata value types -> struct format (8 string and 9 array are read by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFTensorError(ValueError):
    """A tensor entry that does not fit the file (unknown type, partial block rows, data past the end)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first (GGUF order): a matrix [N, K] is (K, N)
    data_offset: int  # absolute, in the file
    data: np.ndarray  # uint8 [N, row bytes] for block types, else the element type with numpy's shape


class GGUFFile:
    def __init__(self, path: str):
        import gguf

        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ValueError("empty file") from None
        buf = self._map
        self._pos = 0
        magic, version = self._read("<4sI")
        if magic != b"GGUF":
            raise ValueError(f"bad magic {magic!r} (expected b'GGUF')")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._read("<QQ")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._read("<I")
            self.fields[key] = self._value(vtype)
        infos, names = [], set()
        for _ in range(n_tensors):
            name = self._string()
            if name in names:  # the last copy would win silently (gguf's own reader refuses it too)
                raise ValueError(f"tensor {name!r} appears twice in the file")
            names.add(name)
            (n_dims,) = self._read("<I")
            dims = self._read(f"<{n_dims}Q")
            raw_type, offset = self._read("<IQ")
            infos.append((name, dims, raw_type, offset))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 20:
            raise ValueError(f"general.alignment must be an integer in [1, 2**20], got {alignment!r}")
        start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, dims, raw_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFTensorError(f"tensor {name!r} has an unknown GGUF type {raw_type}", name) from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row = int(dims[0]) if dims else 1
            if row % block:
                raise GGUFTensorError(f"tensor {name!r}: row length {row} is not a multiple of the {qtype.name} "
                                      f"block size {block}", name)
            n_elements = math.prod(int(d) for d in dims)  # Python ints: no overflow on hostile dims
            nbytes = n_elements // block * type_size
            if offset % alignment:  # as llama.cpp: data must start on the file's alignment
                raise GGUFTensorError(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment "
                                      f"{alignment}", name)
            begin = start + offset
            if begin + nbytes > len(buf):
                raise GGUFTensorError(f"tensor {name!r} is truncated: its data ends at byte {begin + nbytes}, the "
                                      f"file has {len(buf)} bytes", name)
            np_shape = tuple(int(d) for d in reversed(dims))  # outermost first
            if qtype.name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
                dtype = np.dtype(qtype.name.lower().replace("f", "float").replace("i", "int"))
                data = np.frombuffer(buf, dtype=dtype, count=n_elements, offset=begin).reshape(np_shape)
            else:  # blocks (and BF16): rows of bytes
                data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=begin)
                data = data.reshape(*np_shape[:-1], row // block * type_size)
            self.tensors.append(GGUFTensor(name, qtype, tuple(int(d) for d in dims), begin, data))

    @property
    def memory_map(self) -> mmap.mmap:
        """The read-only map of the file that every tensor's data is a view of."""
        return self._map

    def _read(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._read("<Q")
        s = self._map[self._pos:self._pos + n]
        if len(s) != n:
            raise ValueError("truncated metadata")
        self._pos += n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read("<" + _SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype == 9:
            item_type, n = self._read("<IQ")
            if item_type in _NUMPY:  # numbers: a read-only numpy view of the file, not a Python list (a list
                dtype = np.dtype(_NUMPY[item_type])  # took ~8.6x the array's bytes, for keys never read too)
                values = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._pos)
                self._pos += n * dtype.itemsize
                return values
            if item_type == 8:  # strings (tokens, merges: ~10^5 of them): one tight loop
                m, pos, unpack, out = self._map, self._pos, struct.unpack_from, []
                for _ in range(n):
                    k = unpack("<Q", m, pos)[0]
                    out.append(m[pos + 8:pos + 8 + k].decode("utf-8", "replace"))
                    pos += 8 + k
                self._pos = pos
                return out
            return [self._value(item_type) for _ in range(n)]
        raise ValueError(f"unknown GGUF metadata type {vtype}")
