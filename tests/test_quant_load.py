"""GGUF files with packed weights: load(weights=...) keeps Q8_0 / Q4_0 / Q4_1 blocks memory-mapped and
builds the reference module only on demand; the engine computes with the blocks (greedy self-speculative
== autoregressive on them, a batch == each row alone); K-quants load dequantized; bad files fail naming
the tensor."""
import os
import struct

import gguf
import numpy as np
import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext.gguf_write import write_gguf
from layerskip_ext.quant import PackedWeight, packed_module

from conftest import make_hf_checkpoint

FORMATS = ["q8_0", "q4_0", "q4_1"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small random Llama (GQA, untied head, rows multiples of 32) as a HF directory and loaded in fp32."""
    directory = make_hf_checkpoint(str(tmp_path_factory.mktemp("qhf")), seed=7, std=0.2, num_hidden_layers=3,
                                   hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=160, tie_word_embeddings=False)
    return directory, layerskip_ext.load(directory)


@pytest.fixture(scope="module")
def gguf_files(hf_model, tmp_path_factory):
    """The same model written as GGUF files, one per format (our quantizer, gguf's writer)."""
    directory = tmp_path_factory.mktemp("qgguf")
    _, model = hf_model
    paths = {}
    for fmt in FORMATS:
        paths[fmt] = str(directory / f"tiny.{fmt}.gguf")
        write_gguf(paths[fmt], model.config, model.weights, fmt)
    return paths


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_blocks_stay_packed_and_equal_the_file(gguf_files, fmt):
    path = gguf_files[fmt]
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(path)
    assert model.packed_formats == {fmt} and model._module is None  # nothing dequantized yet
    q = model.weights["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(q, PackedWeight) and q.shape == (64, 64)
    up = model.weights["model.layers.0.mlp.up_proj.weight"]
    # a view of the file's bytes: the memory map, not a copy
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    np.testing.assert_array_equal(up.data.numpy(), raw.data)
    # the module, built on demand, holds gguf's own dequantization (HF row order)
    with pytest.warns(UserWarning, match="tokenizer"):
        fp32 = layerskip_ext.load(path, weights="fp32")
    ref = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
    torch.testing.assert_close(fp32.module.model.layers[0].mlp.up_proj.weight.detach(), ref, rtol=0, atol=0)
    for name, param in model.module.state_dict().items():
        torch.testing.assert_close(param, fp32.module.state_dict()[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_hf_checkpoint_quantized_on_load(hf_model, fmt):
    directory, fp32 = hf_model
    model = layerskip_ext.load(directory, weights=fmt)
    assert model.packed_formats == {fmt}
    w = model.weights["model.layers.2.mlp.down_proj.weight"]
    ref = fp32.module.model.layers[2].mlp.down_proj.weight.detach()
    step = {"q8_0": 1 / 127, "q4_0": 1 / 8, "q4_1": 2 / 15}[fmt] * ref.abs().max()
    assert (w.dequantize() - ref).abs().max() <= step


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_on_packed_weights(gguf_files, fmt):
    """The engine's greedy tokens on packed weights equal the packed reference forward's, and greedy
    self-speculative decoding on them is lossless (== autoregressive), for several exits and drafts."""
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(gguf_files[fmt])
    prompt = [5, 17, 99, 3, 42]
    common = dict(max_new_tokens=20, stop_token_ids=[])
    auto = layerskip_ext.generate(model, prompt, **common)
    assert engine_mod.get_engine(model).weight_dtype == engine_mod.PACKED
    # the same matmuls through the pure-PyTorch forward (other float kernels for norms and attention, so
    # an activation may round to the neighbouring int8 code): teacher-forced on the engine's tokens, each
    # is the argmax there or within that noise of it (a wrong block layout or scale gives far larger gaps)
    module = packed_module(model)
    with torch.no_grad():
        logits = module(torch.tensor([prompt + auto.tokens]))[0, len(prompt) - 1:-1]  # [new, V]
    chosen = logits.gather(1, torch.tensor(auto.tokens).unsqueeze(1))[:, 0]
    gap = logits.amax(1) - chosen  # 0 where the engine took the argmax
    assert (gap <= 0.05 * logits.abs().amax(1)).all(), gap
    assert (gap == 0).float().mean() >= 0.5
    for exit_layer, d in [(1, 1), (1, 3), (2, 4)]:
        spec = layerskip_ext.generate(model, prompt, strategy="self_speculative", exit_layer=exit_layer,
                                      num_speculations=d, **common)
        assert spec.tokens == auto.tokens, (exit_layer, d)
    early = layerskip_ext.generate(model, prompt, strategy="early_exit", exit_layer=2, **common)
    assert len(early.tokens) == common["max_new_tokens"]
    sampled = [layerskip_ext.generate(model, prompt, temperature=0.8, seed=3, **common).tokens for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_on_packed_weights_equals_each_row_alone(gguf_files, fmt):
    """Rows of different lengths, strategies and sampling in one batch yield exactly their batch-1 tokens."""
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(gguf_files[fmt])
    prompts = [[5, 17, 99, 3, 42], [7, 8], list(range(20, 51)), [150, 2, 2, 9]]
    kwargs = dict(max_new_tokens=[12, 9, 15, 11], stop_token_ids=[],
                  strategy=["autoregressive", "self_speculative", "self_speculative", "autoregressive"],
                  exit_layer=[None, 1, 2, None], num_speculations=[None, 3, 2, None],
                  temperature=[0.0, 0.0, 0.7, 0.9], seed=[None, None, 5, 11])
    batch = layerskip_ext.generate(model, prompts, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = layerskip_ext.generate(model, prompt, **{k: (v[i] if isinstance(v, list) and k != "stop_token_ids"
                                                             else v) for k, v in kwargs.items()})
        assert batch[i].tokens == alone.tokens, i


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
def test_engine_releases_the_file_pages_it_copied(gguf_files, hf_model, monkeypatch):
    """Building the packed engine (which interleaves its own copy of every packed matrix) releases the GGUF
    file's mapped pages: every packed view of the file knows its map, the map is released once, and what reads the
    released pages afterwards (the reference module, another generation) sees the file's bytes unchanged.
    Matrices that own their memory (quantized on load) have no map: nothing of theirs is ever released."""
    released = []
    real = engine_mod.release_file_pages
    monkeypatch.setattr(engine_mod, "release_file_pages", lambda m: released.append(real(m)) or released[-1])
    path = gguf_files["q4_1"]
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(path)
    copies = {name for name, w in model.weights.items() if isinstance(w, PackedWeight) and w.file_map is None}
    assert copies == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(3) for m in "qk"}  # row-permuted
    prompt = [5, 17, 99, 3, 42]
    first = layerskip_ext.generate(model, prompt, max_new_tokens=12, stop_token_ids=[])
    assert released == [1]  # one file, one map
    with pytest.warns(UserWarning, match="tokenizer"):
        fresh = layerskip_ext.load(path, weights="fp32")
    for name, param in model.module.state_dict().items():  # dequantized from the re-read pages
        torch.testing.assert_close(param, fresh.module.state_dict()[name], rtol=0, atol=0, msg=name)
    again = layerskip_ext.generate(model, prompt, max_new_tokens=12, stop_token_ids=[])
    assert again.tokens == first.tokens
    quantized = layerskip_ext.load(hf_model[0], weights="q4_1")
    assert all(w.file_map is None for w in quantized.weights.values() if isinstance(w, PackedWeight))
    layerskip_ext.generate(quantized, prompt, max_new_tokens=4, stop_token_ids=[])
    assert released[-1] == 0


def test_engine_bytes_per_token_counts_packed_bytes(gguf_files):
    if not engine_mod.is_available():
        pytest.skip("C++ extension not built")
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(gguf_files["q4_0"])
    packed = engine_mod.get_engine(model).weight_bytes_per_token
    fp32 = engine_mod.get_engine(model, torch.float32).weight_bytes_per_token
    assert packed < fp32 * 18 / 128 + 64 * 4 * 10  # 18 bytes per 32 weights (+ float norms and embedding row)


# ----------------------------------------------------------------------------------------------
# K-quants and bad files


def _write_with(path, config, weights, replace_name, array, raw_dtype=None):
    """A GGUF of the model where tensor `replace_name` (GGUF name) is `array` instead."""
    writer = gguf.GGUFWriter(path, "llama")
    real = str(path) + ".tmp.gguf"
    write_gguf(real, config, weights, "q8_0")
    reader = gguf.GGUFReader(real)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name == replace_name:
            writer.add_tensor(t.name, array, raw_dtype=raw_dtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.remove(real)


def test_k_quant_tensor_loads_as_bf16(hf_model, tmp_path):
    """A Q6_K matrix (256-wide rows: gate_proj of a model with hidden 256) loads dequantized to bfloat16."""
    directory = make_hf_checkpoint(str(tmp_path / "hf"), seed=1, num_hidden_layers=1, hidden_size=256,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=64, tie_word_embeddings=True)
    model = layerskip_ext.load(directory)
    gate = model.weights["model.layers.0.mlp.gate_proj.weight"]  # [64, 256]
    # gguf cannot quantize to Q6_K: random codes and scales, with a finite fp16 super-block scale d (last 2 bytes)
    q6k = np.random.default_rng(0).integers(0, 256, size=(gate.shape[0], 210), dtype=np.uint8)
    q6k[:, 208:210] = np.array([0.01], dtype=np.float16).view(np.uint8)
    path = str(tmp_path / "k.gguf")
    _write_with(path, model.config, model.weights, "blk.0.ffn_gate.weight", q6k, gguf.GGMLQuantizationType.Q6_K)
    with pytest.warns(UserWarning, match="tokenizer"):
        loaded = layerskip_ext.load(path)
    got = loaded.weights["model.layers.0.mlp.gate_proj.weight"]
    assert got.dtype == torch.bfloat16
    want = gguf.quants.dequantize(q6k, gguf.GGMLQuantizationType.Q6_K)
    torch.testing.assert_close(got.float(), torch.from_numpy(want).bfloat16().float(), rtol=0, atol=0)
    assert loaded.packed_formats == {"q8_0"}
    if engine_mod.is_available():  # gate (bf16 -> float32) and up (Q8_0) differ: that group is dequantized
        layerskip_ext.generate(loaded, [1, 2, 3], max_new_tokens=4, stop_token_ids=[])


def test_unsupported_block_format_names_the_tensor(hf_model, tmp_path):
    _, model = hf_model
    path = str(tmp_path / "i8.gguf")
    _write_with(path, model.config, model.weights, "blk.1.attn_v.weight", np.ones((32, 64), dtype=np.int8))
    with pytest.raises(layerskip_ext.CheckpointError, match="'blk.1.attn_v.weight' uses the GGUF quantization I8") as e:
        layerskip_ext.load(path)
    assert e.value.field == "blk.1.attn_v.weight"


def test_truncated_tensor_names_the_tensor(gguf_files, tmp_path):
    path = str(tmp_path / "cut.gguf")
    data = open(gguf_files["q8_0"], "rb").read()
    last = max(gguf.GGUFReader(gguf_files["q8_0"]).tensors, key=lambda t: t.data_offset)
    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(layerskip_ext.CheckpointError, match=f"tensor '{last.name}' is truncated") as e:
        layerskip_ext.load(path)
    assert e.value.field == last.name


def test_row_length_not_a_multiple_of_the_block_names_the_tensor(gguf_files, tmp_path):
    """The file's dims of a Q8_0 tensor patched to rows of 48 values."""
    data = bytearray(open(gguf_files["q8_0"], "rb").read())
    name = b"blk.0.ffn_down.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # then n_dims u32, dims u64...
    assert struct.unpack_from("<I", data, at)[0] == 2
    struct.pack_into("<Q", data, at + 4, 48)
    path = str(tmp_path / "rows.gguf")
    open(path, "wb").write(bytes(data))
    with pytest.raises(layerskip_ext.CheckpointError,
                       match="'blk.0.ffn_down.weight': row length 48 is not a multiple of the Q8_0") as e:
        layerskip_ext.load(path)
    assert e.value.field == "blk.0.ffn_down.weight"


def model_names(directory) -> set[str]:
    from layerskip_ext.checkpoint import load_hf_directory
    return set(load_hf_directory(directory)[1])


def test_hf_row_length_not_a_multiple_of_the_block_names_the_tensor(tmp_path):
    directory = make_hf_checkpoint(str(tmp_path / "hf"), num_hidden_layers=1, hidden_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=64)
    with pytest.raises(layerskip_ext.CheckpointError, match="not a multiple of the q4_0 block size 32") as e:
        layerskip_ext.load(directory, weights="q4_0")
    assert e.value.field in model_names(directory) and e.value.field in str(e.value)


def test_gguf_float_rows_not_a_multiple_of_the_block_name_the_file(tmp_path):
    """An F32 GGUF with rows of 48 values, packed on load: the error names the file and the tensor."""
    from layerskip_ext.checkpoint import load_hf_directory
    from layerskip_ext.gguf_write import write_gguf
    directory = make_hf_checkpoint(str(tmp_path / "hf"), num_hidden_layers=1, hidden_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=64)
    config, state, _ = load_hf_directory(directory)
    path = str(tmp_path / "f32.gguf")
    write_gguf(path, config, state, fmt="f32")
    with pytest.raises(layerskip_ext.CheckpointError, match="not a multiple of the q8_0 block size 32") as e:
        layerskip_ext.load(path, weights="q8_0")
    assert path in str(e.value) and e.value.field in str(e.value) and e.value.path == path


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
def test_engine_checks_packed_weights_by_name(gguf_files):
    """The C++ engine's own checks (a caller bypassing load()): an unknown block format, bytes that do not
    match the shape, a packed vector, a fused group mixing formats; each names the weight."""
    with pytest.warns(UserWarning, match="tokenizer"):
        model = layerskip_ext.load(gguf_files["q8_0"])
    tensors, formats, dtype = engine_mod.packed_weight_tensors(model)
    c = model.config
    config = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads,
                  num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                  vocab_size=c.vocab_size, max_rows=1, capacity=16)
    table = torch.zeros(c.max_position_embeddings, c.head_dim)

    def build(t, f):
        return torch.classes.layerskip.Engine(config, 1e-5, table, t, f, dtype)

    build(tensors, formats)  # as given: fine
    o = "model.layers.1.self_attn.o_proj.weight"
    with pytest.raises(RuntimeError, match=f"{o} has an unsupported block format 6"):
        build(tensors, {**formats, o: 6})
    with pytest.raises(RuntimeError, match=f"packed weight {o} .* must be uint8"):
        build({**tensors, o: tensors[o][:, :-1]}, formats)
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(RuntimeError, match=f"{norm} is a vector"):
        build(tensors, {**formats, norm: 8})
    up = "model.layers.2.mlp.up_proj.weight"
    with pytest.raises(RuntimeError, match="model.layers.2.mlp.{gate,up}_proj must share one format"):
        build({**tensors, up: model.weights[up].dequantize()}, {k: v for k, v in formats.items() if k != up})


def test_weights_argument_checked(gguf_files):
    with pytest.raises(layerskip_ext.LayerSkipError, match="weights must be one of"):
        layerskip_ext.load(gguf_files["q8_0"], weights="q5_0")
