"""Writing llama GGUF files from a state dict in HF layout: for tests (small models, bad files) and for the
llama.cpp benchmark (the default model re-encoded as Q8_0 / Q4_0 / Q4_1 with our quantizer).

    write_gguf(path, config, weights, fmt="q8_0", metadata_from=None)
    convert_gguf(src, dst, fmt)   # same model, metadata and tokenizer, matrices in `fmt`
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import ModelConfig
from .errors import LayerSkipError
from .quant import FORMATS, PackedWeight, quantize

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
# metadata the writer sets itself, or that describes the source file's encoding
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def rope_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> GGUF's interleaved rows (the inverse of checkpoint.undo_rope_permutation)."""
    rows, cols = w.shape
    d_half = rows // n_heads // 2
    return w.reshape(n_heads, 2, d_half, cols).transpose(1, 2).reshape(rows, cols)


def gguf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")  # model.layers.{i}.{module...}.weight
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"


def write_gguf(path: str, config: ModelConfig, weights: dict, fmt: str = "q8_0", metadata_from=None) -> None:
    """Writes a llama GGUF: matrices in `fmt` ("q8_0" | "q4_0" | "q4_1" | "f32"), vectors in F32.

    weights: HF names -> float tensors or PackedWeight. metadata_from: a gguf.GGUFReader whose other
    metadata (tokenizer, names, chat template) is copied."""
    import gguf

    c = config
    kind = None if c.rope_scaling is None else c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
    if kind == "llama3":  # llama.cpp stores it as a rope_freqs tensor, which load_gguf refuses
        raise LayerSkipError("write_gguf: llama3 rope_scaling cannot be written to GGUF here (keep the HF checkpoint)")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_heads != c.hidden_size:  # llama.cpp takes hidden / heads unless these say otherwise
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    # "dynamic" needs nothing: within max_position_embeddings it is the plain RoPE (config.ROPE_SCALINGS)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if metadata_from is not None:
        for key, field in metadata_from.fields.items():
            if key.startswith(_SKIP_KEYS) or key.startswith("llama."):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    else:
        if c.bos_token_id is not None:
            writer.add_bos_token_id(c.bos_token_id)
        if c.eos_token_ids:
            writer.add_eos_token_id(c.eos_token_ids[0])
            if len(c.eos_token_ids) > 1:  # GGUF's tokenizer.ggml.eos_token_id holds one id
                warnings.warn(f"write_gguf: the model has {len(c.eos_token_ids)} EOS ids {list(c.eos_token_ids)}; "
                              f"GGUF stores one, {c.eos_token_ids[0]}", UserWarning, stacklevel=2)
    for name, w in weights.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if isinstance(w, PackedWeight) and w.fmt == fmt:
            tensor = w
        else:
            tensor = w.dequantize() if isinstance(w, PackedWeight) else w.detach().float()
            if tensor.dim() == 2 and fmt != "f32":
                if tensor.shape[1] % 32:
                    raise LayerSkipError(f"write_gguf: tensor {name!r} has rows of {tensor.shape[1]} values, not a "
                                         f"multiple of the {fmt} block size 32 (write fmt='f32')")
                tensor = quantize(tensor, fmt)
        module = ".".join(name.split(".")[3:-1])  # model.layers.{i}.self_attn.q_proj.weight -> self_attn.q_proj
        heads = {"self_attn.q_proj": c.num_heads, "self_attn.k_proj": c.num_kv_heads}.get(module)
        if heads is not None:
            if isinstance(tensor, PackedWeight):
                rows = torch.arange(tensor.out_features).unsqueeze(1)
                tensor = tensor.permute_rows(rope_permutation(rows, heads)[:, 0])
            else:
                tensor = rope_permutation(tensor, heads)
        if isinstance(tensor, PackedWeight):
            writer.add_tensor(gguf_name(name), tensor.data.numpy(), raw_dtype=gguf.GGMLQuantizationType(
                FORMATS[tensor.fmt][0]))
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert_gguf(src: str, dst: str, fmt: str) -> None:
    """Re-encodes the GGUF `src` with every matrix in `fmt` (from its dequantized values), same metadata."""
    import gguf

    from .checkpoint import load_gguf
    config, weights, _ = load_gguf(src, weights="auto")
    write_gguf(dst, config, weights, fmt, metadata_from=gguf.GGUFReader(src))
