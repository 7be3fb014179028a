"""GGUF files that are cut, corrupt or carry settings we do not compute: each load ends in a CheckpointError
naming the file (and the tensor or key), never a crash or a model running on misread bytes; RoPE scaling
metadata is read (linear) or refused (yarn, longrope), never ignored, and our writer keeps it.

Edits are made at exact byte positions: gguf.GGUFReader locates each tensor-info entry (name length, name,
dimension count, dimensions, type, data offset)."""
from __future__ import annotations

import os
import struct

import pytest
import torch

import layerskip_ext
from layerskip_ext import CheckpointError, LayerSkipError
from layerskip_ext.gguf_write import write_gguf
from conftest import make_hf_checkpoint

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "m", **TINY)


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def gguf_file(request, hf_dir, tmp_path_factory):
    """(path, bytes, {tensor name: byte position of each tensor-info part}) of a valid GGUF."""
    import gguf
    model = layerskip_ext.load(hf_dir)
    path = str(tmp_path_factory.mktemp("gguf") / f"m.{request.param}.gguf")
    write_gguf(path, model.config, model.weights, request.param)
    reader = gguf.GGUFReader(path)
    parts = {}
    for t in reader.tensors:
        sizes = [p.nbytes for p in t.field.parts]  # name length, name, n_dims, dims, type, offset
        positions = [t.field.offset + sum(sizes[:i]) for i in range(len(sizes))]
        parts[t.name] = dict(n_dims=positions[2], dims=positions[3], type=positions[4], offset=positions[5])
    with open(path, "rb") as f:
        return path, f.read(), parts


def load_bytes(tmp_path, data: bytes):
    path = tmp_path / "edited.gguf"
    path.write_bytes(data)
    return layerskip_ext.load(str(path))


def patched(raw: bytes, position: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, position, value)
    return bytes(out)


@pytest.mark.parametrize("data,match", [
    (b"", "empty file"),
    (b"GG", "not a valid GGUF"),
    (b"GGUF", "not a valid GGUF"),
    (b"GGUF\x03\x00\x00\x00", "not a valid GGUF"),
    (b"GGML" + bytes(60), "bad magic"),
    (b"GGUF" + struct.pack("<I", 1) + bytes(60), "version 1"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1, 2**63) + bytes(64), "not a valid GGUF"),  # kv count past the file
    (b"GGUF" + struct.pack("<IQQ", 3, 2**63, 0) + bytes(64), "not a valid GGUF"),  # tensor count past the file
    (b"GGUF" + struct.pack("<I", 3) + bytes(range(256)) * 8, "not a valid GGUF"),
])
def test_short_and_garbage_headers(tmp_path, data, match):
    with pytest.raises(CheckpointError, match=match):
        load_bytes(tmp_path, data)


def test_cut_anywhere_is_an_error_naming_the_file(tmp_path, gguf_file):
    _, raw, _ = gguf_file
    for cut in (7, 23, 100, len(raw) // 2, len(raw) - 1):
        with pytest.raises(CheckpointError, match="edited.gguf"):
            load_bytes(tmp_path, raw[:cut])


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"])
def test_corrupt_tensor_entries_name_the_tensor(tmp_path, gguf_file, tensor):
    _, raw, parts = gguf_file
    p = parts[tensor]
    offset = struct.unpack_from("<Q", raw, p["offset"])[0]
    edits = [
        (p["offset"], "<Q", 2**62, "truncated"),  # data past the end of the file
        (p["offset"], "<Q", 2**64 - 32, "truncated"),  # an offset that overflows 64 bits when added
        (p["offset"], "<Q", offset + 1, "alignment"),  # misaligned: would read shifted bytes as weights
        (p["offset"], "<Q", offset + 4, "alignment"),
        (p["type"], "<I", 9999, "unknown GGUF type"),
        (p["type"], "<I", 24, "not supported"),  # I8
        (p["dims"], "<Q", 2**40, "truncated"),
        (p["dims"], "<Q", 0, "shape"),
    ]
    for position, fmt, value, match in edits:
        with pytest.raises(CheckpointError, match=match) as info:
            load_bytes(tmp_path, patched(raw, position, fmt, value))
        assert tensor in str(info.value), (fmt, value, str(info.value))
    for n_dims in (0, 2**31):  # the entries after it are misread: any clear error
        with pytest.raises(CheckpointError, match="edited.gguf"):
            load_bytes(tmp_path, patched(raw, p["n_dims"], "<I", n_dims))


def test_the_unedited_file_loads_and_generates(tmp_path, gguf_file, hf_dir):
    _, raw, _ = gguf_file
    model = load_bytes(tmp_path, raw)
    assert len(layerskip_ext.generate(model, [1, 2, 3], max_new_tokens=4, stop_token_ids=[]).tokens) == 4


# ---------------------------------------------------------------------------------------------------
# RoPE scaling metadata


@torch.no_grad()
def test_linear_rope_scaling_round_trips_through_gguf(tmp_path):
    from transformers import LlamaForCausalLM
    directory = make_hf_checkpoint(tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 4.0}, **TINY)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = layerskip_ext.load(directory)
    path = str(tmp_path / "m.gguf")
    write_gguf(path, model.config, model.weights, "f32")
    loaded = layerskip_ext.load(path)
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = torch.tensor([[5, 9, 1, 40, 77, 3, 12, 60, 2, 31, 8, 50, 6, 7, 90, 11]])
    torch.testing.assert_close(loaded.module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert layerskip_ext.generate(loaded, ids[0].tolist(), max_new_tokens=12, stop_token_ids=[],
                                  backend="engine").tokens == expected[0, 16:].tolist()


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_unsupported_gguf_rope_scaling_is_refused(tmp_path, hf_dir, kind):
    import gguf
    model = layerskip_ext.load(hf_dir)
    path = str(tmp_path / "m.gguf")
    original = gguf.GGUFWriter.add_rope_freq_base

    def add_rope_freq_base(self, value):  # our writer writes no scaling for this model: add one
        original(self, value)
        self.add_rope_scaling_type(gguf.RopeScalingType(kind))
        self.add_rope_scaling_factor(4.0)

    gguf.GGUFWriter.add_rope_freq_base = add_rope_freq_base
    try:
        write_gguf(path, model.config, model.weights, "f32")
    finally:
        gguf.GGUFWriter.add_rope_freq_base = original
    with pytest.raises(CheckpointError, match=f"rope.scaling.type '{kind}' is not supported") as info:
        layerskip_ext.load(path)
    assert info.value.field == "llama.rope.scaling.type"


def test_writing_llama3_rope_scaling_to_gguf_is_refused(tmp_path):
    directory = make_hf_checkpoint(tmp_path / "hf", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **TINY)
    model = layerskip_ext.load(directory)
    with pytest.raises(LayerSkipError, match="llama3"):
        write_gguf(str(tmp_path / "m.gguf"), model.config, model.weights, "f32")
    assert not os.path.exists(tmp_path / "m.gguf")


def _gguf_with_head_keys(tmp_path, directory, key_length, rope_dims):
    """Our writer's GGUF of `directory` with llama.attention.key_length / llama.rope.dimension_count replaced
    (None: left out)."""
    import gguf
    model = layerskip_ext.load(directory)
    path = str(tmp_path / "m.gguf")
    original_dims, original_freq = gguf.GGUFWriter.add_rope_dimension_count, gguf.GGUFWriter.add_rope_freq_base

    def add_rope_dimension_count(self, count):
        if rope_dims is not None:
            original_dims(self, rope_dims)

    def add_rope_freq_base(self, value):
        original_freq(self, value)
        if key_length is not None:
            self.add_key_length(key_length)
            self.add_value_length(key_length)

    gguf.GGUFWriter.add_rope_dimension_count = add_rope_dimension_count
    gguf.GGUFWriter.add_rope_freq_base = add_rope_freq_base
    try:
        write_gguf(path, model.config, model.weights, "f32")
    finally:
        gguf.GGUFWriter.add_rope_dimension_count = original_dims
        gguf.GGUFWriter.add_rope_freq_base = original_freq
    return path


@torch.no_grad()
def test_gguf_head_dim_from_key_length(tmp_path):
    """head_dim != hidden / heads: llama.cpp's converter writes llama.attention.key_length; a file with it and
    no rope.dimension_count loaded with head_dim = hidden / heads (a shape error on a valid file)."""
    from transformers import LlamaForCausalLM
    directory = make_hf_checkpoint(tmp_path / "hf", **dict(TINY, head_dim=24))
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 1, 40, 77, 3, 12, 60]])
    for rope_dims in (24, None):
        loaded = layerskip_ext.load(_gguf_with_head_keys(tmp_path, directory, 24, rope_dims))
        assert loaded.config.head_dim == 24
        torch.testing.assert_close(loaded.module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_gguf_partial_rotary_is_refused(tmp_path, hf_dir):
    """rope.dimension_count below the head size rotates only part of each head: refused by name, where it was
    read as the head size (and failed on a tensor's shape)."""
    with pytest.raises(CheckpointError, match="rotates 4 of the 8 dimensions") as info:
        layerskip_ext.load(_gguf_with_head_keys(tmp_path, hf_dir, 8, 4))
    assert info.value.field == "llama.rope.dimension_count"


def test_a_duplicated_tensor_name_is_refused(tmp_path, gguf_file):
    """Two tensors of one name: refused (the last copy won silently, and chat raised gguf's own ValueError)."""
    _, raw, _ = gguf_file
    assert raw.count(b"blk.0.attn_q.weight") == 1
    with pytest.raises(CheckpointError, match="'blk.0.attn_k.weight' appears twice"):
        load_bytes(tmp_path, raw.replace(b"blk.0.attn_q.weight", b"blk.0.attn_k.weight"))


@pytest.mark.parametrize("value,adder", [("abc", "add_string"), (1.5, "add_float32"), ([1, 2], "add_array")])
def test_chat_template_token_ids_of_the_wrong_type_name_the_key(tmp_path, value, adder):
    """A special-token id that is not an integer is a CheckpointError naming the key (was a raw ValueError for "abc",
    a TypeError for an array, and 1.5 was taken as token 1)."""
    import gguf
    from layerskip_ext.chat import find_chat_template
    path = str(tmp_path / "meta.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }}")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a"])
    getattr(writer, adder)("tokenizer.ggml.padding_token_id", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="tokenizer.ggml.padding_token_id must be an integer"):
        find_chat_template(path)


def test_numeric_metadata_arrays_are_not_copied_into_python_lists(tmp_path):
    """A 3 MB u8 array under a key nobody reads: the reader keeps a view of the file (a Python list of it took
    ~8.6x its bytes, before load() even looked at the keys)."""
    import tracemalloc

    import gguf
    import numpy as np
    from layerskip_ext.gguf_read import GGUFFile
    path = str(tmp_path / "junk.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("x.junk", (np.arange(3_000_000) % 251).astype(np.uint8).tolist())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tracemalloc.start()
    try:
        junk = GGUFFile(path).fields["x.junk"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(junk) == 3_000_000 and int(junk[300]) == 300 % 251
    assert peak < 5_000_000, peak


def test_writer_states_a_head_size_other_than_hidden_over_heads(tmp_path):
    """head_dim 40 with hidden 96 and 3 heads: the writer adds attention.key_length / value_length (llama.cpp takes
    hidden / heads = 32 otherwise, and refuses the file), and the file loads back to the same logits."""
    import gguf
    directory = make_hf_checkpoint(tmp_path / "hf", **dict(TINY, hidden_size=96, num_attention_heads=3,
                                                           num_key_value_heads=1, head_dim=40))
    model = layerskip_ext.load(directory)
    path = str(tmp_path / "m.gguf")
    write_gguf(path, model.config, model.weights, "f32")
    reader = gguf.GGUFReader(path)
    for key in ("llama.attention.key_length", "llama.attention.value_length"):
        assert reader.fields[key].contents() == 40
    back = layerskip_ext.load(path)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(back.module(ids), model.module(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerSkipError, match="'model.layers.0.self_attn.o_proj.weight' has rows of 120 values"):
        write_gguf(str(tmp_path / "q.gguf"), model.config, model.weights, "q8_0")


def test_writer_warns_when_eos_ids_are_dropped(tmp_path):
    directory = make_hf_checkpoint(tmp_path / "hf", **dict(TINY, eos_token_id=[2, 5]))
    model = layerskip_ext.load(directory)
    with pytest.warns(UserWarning, match=r"2 EOS ids \[2, 5\]; GGUF stores one, 2"):
        write_gguf(str(tmp_path / "m.gguf"), model.config, model.weights, "f32")
