"""Loading: HF directories and GGUF files, and a clear error for every kind of bad input."""
import json
import os

import numpy as np
import pytest
import torch

import layerskip_ext
from layerskip_ext.checkpoint import undo_rope_permutation
from conftest import make_hf_checkpoint

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, tie_word_embeddings=False)


@pytest.fixture
def tiny_dir(tmp_path):
    return make_hf_checkpoint(tmp_path / "tiny", **TINY)


def test_loads_hf_directory_with_its_dtype_and_config(random_checkpoint):
    from transformers import LlamaForCausalLM
    _, directory = random_checkpoint
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        model = layerskip_ext.load(directory, dtype=dtype)
        assert model.dtype == dtype
        assert model.config.num_layers == hf.config.num_hidden_layers
        assert model.config.head_dim == hf.config.head_dim
        assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
        for name, tensor in hf.state_dict().items():
            torch.testing.assert_close(model.module.state_dict()[name], tensor.to(dtype), rtol=0, atol=0)
    if model.config.tie_word_embeddings:
        assert model.module.lm_head.weight is model.module.model.embed_tokens.weight


def test_tokenizer_json_is_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    directory = make_hf_checkpoint(tmp_path / "m", **TINY)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=64, show_progress=False,
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    model = layerskip_ext.load(directory)
    assert model.encode("hello world") == tok.encode("hello world").ids


# ----------------------------------------------------------------------------------------------
# GGUF


def redo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (the inverse of undo_rope_permutation)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path, hf_state, config, qtype, tokenizer=True, arch="llama"):
    """Writes a llama GGUF of `hf_state` with matrices in `qtype` (norms stay F32)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_context_length(128)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    if tokenizer:
        from tokenizers import pre_tokenizers
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tokens = alphabet + ["ab", "abc"] + ["<eos>"]
        tokens += [f"<unused{i}>" for i in range(config["vocab_size"] - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(["a b", "ab c"])
        w.add_token_types([1] * (len(alphabet) + 2) + [3] * (len(tokens) - len(alphabet) - 2))
        w.add_eos_token_id(len(alphabet) + 2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in hf_state.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer_names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = names[name]
        data = tensor.float().numpy()
        if "q_proj" in name:
            data = redo_rope_permutation(data, config["num_attention_heads"])
        if "k_proj" in name:
            data = redo_rope_permutation(data, config["num_key_value_heads"])
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, data.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("qname", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_hf_weights_after_undoing_rope_permutation(tmp_path, qname):
    import gguf
    from transformers import LlamaForCausalLM
    qtype = gguf.GGMLQuantizationType[qname]
    config = dict(TINY, intermediate_size=64, hidden_size=64, vocab_size=300)
    directory = make_hf_checkpoint(tmp_path / "hf", **config)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = write_gguf(tmp_path / f"m.{qname}.gguf", hf.state_dict(), config, qtype)
    model = layerskip_ext.load(path)
    assert model.config.num_kv_heads == 2 and not model.config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        got = model.module.state_dict()[name]
        if tensor.dim() == 2 and qname not in ("F32", "F16"):
            # quantization error only: the round trip of the same rows through the same format
            expected = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            torch.testing.assert_close(got, torch.from_numpy(expected), rtol=0, atol=1e-6)
            assert (got - tensor).abs().max() < 0.1 * tensor.abs().max()
        else:
            tol = 1e-3 if qname == "F16" else 0
            torch.testing.assert_close(got, tensor, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    assert model.encode("abc ab") == [model.tokenizer.token_to_id("abc"), model.tokenizer.token_to_id("Ġ"),
                                     model.tokenizer.token_to_id("ab")]
    assert model.config.eos_token_ids == (model.tokenizer.token_to_id("<eos>"),)


def test_undo_rope_permutation_is_the_inverse_of_llama_cpp_permutation():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    permuted = redo_rope_permutation(w, 2)
    assert permuted[1, 0] == w[4, 0]  # GGUF row 2i+1 of head 0 (i=0) is HF row D/2 + i = 4
    torch.testing.assert_close(undo_rope_permutation(torch.from_numpy(permuted), 2), torch.from_numpy(w))


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(smollm2):
    """SmolLM2's GGUF read by transformers (its own dequantization and un-permutation) == ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from layerskip_ext.checkpoint import default_model_path
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    ours = smollm2.module.state_dict()
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = "Hello world! 12345 café naïve <|im_start|>user\n  def f(x):\treturn x**2 # 🙂"
    assert smollm2.encode(text) == tok(text)["input_ids"]
    assert smollm2.config.num_layers == 30 and smollm2.config.num_kv_heads == 3
    assert smollm2.config.eos_token_ids == (2,)


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        layerskip_ext.load("/nonexistent/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        layerskip_ext.load(str(tmp_path))


def test_not_a_model_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="neither"):
        layerskip_ext.load(str(p))


def edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del config[k]
    with open(path, "w") as f:
        json.dump(config, f)


def test_unsupported_model_type(tiny_dir):
    edit_config(tiny_dir, model_type="mistral")
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        layerskip_ext.load(tiny_dir)


def test_config_missing_key(tiny_dir):
    edit_config(tiny_dir, num_hidden_layers=None)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        layerskip_ext.load(tiny_dir)


def test_config_bad_heads(tiny_dir):
    edit_config(tiny_dir, num_key_value_heads=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        layerskip_ext.load(tiny_dir)


def test_missing_weights_file(tiny_dir):
    os.remove(os.path.join(tiny_dir, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        layerskip_ext.load(tiny_dir)


def _rewrite_state(directory, edit):
    from safetensors.torch import load_file, save_file
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tensor(tiny_dir):
    _rewrite_state(tiny_dir, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight' is missing"):
        layerskip_ext.load(tiny_dir)


def test_wrong_shape(tiny_dir):
    def edit(s):
        s["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    _rewrite_state(tiny_dir, edit)
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        layerskip_ext.load(tiny_dir)


def test_truncated_safetensors(tiny_dir):
    path = os.path.join(tiny_dir, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        layerskip_ext.load(tiny_dir)


def test_corrupt_safetensors_header(tiny_dir):
    path = os.path.join(tiny_dir, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[8:20] = b"not json at!"
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        layerskip_ext.load(tiny_dir)


def test_sharded_index_names_missing_shard(tmp_path):
    directory = make_hf_checkpoint(tmp_path / "s", max_shard_size="20KB", **TINY)
    shards = sorted(f for f in os.listdir(directory) if f.startswith("model-"))
    assert len(shards) > 1
    os.remove(os.path.join(directory, shards[-1]))
    with pytest.raises(FileNotFoundError, match="shard"):
        layerskip_ext.load(directory)


def test_unsupported_gguf_quantization(tmp_path):
    import gguf
    from transformers import LlamaForCausalLM
    config = dict(TINY, hidden_size=256, intermediate_size=256)
    directory = make_hf_checkpoint(tmp_path / "hf", **config)
    state = LlamaForCausalLM.from_pretrained(directory).state_dict()
    q = gguf.GGMLQuantizationType.Q2_K
    block_bytes = gguf.GGML_QUANT_SIZES[q][1]
    path = str(tmp_path / "q2k.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_vocab_size(64)
    w.add_tensor("token_embd.weight", np.zeros((64, block_bytes), dtype=np.uint8), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del state
    with pytest.raises(ValueError, match="Q2_K, which is not supported"):
        layerskip_ext.load(path)


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        layerskip_ext.load(path)


def test_truncated_and_garbage_gguf(tmp_path):
    import gguf
    from transformers import LlamaForCausalLM
    directory = make_hf_checkpoint(tmp_path / "hf", **TINY)
    hf = LlamaForCausalLM.from_pretrained(directory)
    path = write_gguf(tmp_path / "m.gguf", hf.state_dict(), TINY, gguf.GGMLQuantizationType.F32, tokenizer=False)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=str(truncated)):
        layerskip_ext.load(str(truncated))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        layerskip_ext.load(str(garbage))


def test_bad_dtype_and_device(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        layerskip_ext.load(tiny_dir, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            layerskip_ext.load(tiny_dir, device="cuda")

