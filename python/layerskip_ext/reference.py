"""Pure-PyTorch Llama with an exit at every layer: the oracle that the C++ engine is tested against.

The module tree and parameter names mirror Hugging Face `LlamaForCausalLM` (model.embed_tokens,
model.layers[i].self_attn.q_proj, ..., model.norm, lm_head), so a state dict moves between the two
unchanged. Every exit uses the model's own final norm and LM head: `exit_logits(x_E)`.

Decoding state lives in a static `KVCache` indexed by position: layers can be run over any range
[start, end) for tokens at positions [start_pos, start_pos + T), which is all that early exit and
self-speculative decoding (reference_generate.py) need.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import LayerSkipError

# ----------------------------------------------------------------------------------------------
# rotary embeddings


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in float64, with the configured scaling (config.ROPE_SCALINGS): linear divides
    them by its factor; dynamic NTK leaves them as they are (transformers rescales only past
    max_position_embeddings, which no context reaches); llama3 rescales them by wavelength."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [D/2]
    scaling = config.rope_scaling
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling["original_max_position_embeddings"])  # set by config._check_rope_scaling
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """inv_freq [D/2] -> [max_positions, D] float32: cos(p * inv_freq), then sin(p * inv_freq), angles in float64.

    The one RoPE table of the project: the reference model, the engine (through rope_cache) and the
    rotary_embedding op's tests (ops.rotary_cos_sin_cache) all use it."""
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # [P, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_cos_sin_cache(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, D] float32: the table of the config's frequencies (layout of the rotary_embedding op)."""
    return cos_sin_table(rope_inv_freq(config), max_positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nh, T, D]; cos, sin [T, D/2] -> rotate-half rotation of x (computed in float32)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, nh, T, D/2] each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Static per-layer key/value buffers [B, Hkv, S, D]; position p lives in slot p."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.capacity = capacity


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer_cache=None, start_pos=0):
        """x [B, T, H]; cos, sin [T, D/2] for positions [start_pos, start_pos + T).

        Without a cache: causal attention within x. With layer_cache = (k [B, Hkv, S, D], v): write
        this step's keys/values at slots [start_pos, start_pos + T) and attend to slots [0, start_pos + T).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_cache is None:
            keys, values, mask = k, v, None
            is_causal = T > 1
        else:
            cache_k, cache_v = layer_cache
            end = start_pos + T
            cache_k[:, :, start_pos:end] = k
            cache_v[:, :, start_pos:end] = v
            keys, values = cache_k[:, :, :end], cache_v[:, :, :end]  # [B, Hkv, end, D]
            # query t (position start_pos + t) sees slots [0, start_pos + t]
            mask = torch.arange(end, device=x.device)[None, :] <= (start_pos + torch.arange(T, device=x.device))[:, None]
            is_causal = False
        groups = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)  # [B, Hq, S', D]
        values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):  # [B, T, H] -> [B, T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, layer_cache=None, start_pos=0):  # [B, T, H] -> [B, T, H]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, start_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class ReferenceLlama(nn.Module):
    """Llama with logits at any exit layer. Same parameter names as HF LlamaForCausalLM."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_cache: torch.Tensor | None = None  # [P, D], built on first use

    def rope_cache(self, positions: int | None = None) -> torch.Tensor:
        """cos | sin table [P, D] (float32, CPU) covering at least `positions` positions (None: all
        max_position_embeddings). Grown by doubling as longer contexts are used, so a model with a huge
        max_position_embeddings does not pay for positions it never reaches."""
        limit = self.config.max_position_embeddings
        positions = limit if positions is None else positions
        if positions > limit:
            raise LayerSkipError(f"positions up to {positions} exceed max_position_embeddings ({limit})")
        if self._rope_cache is None or self._rope_cache.shape[0] < positions:
            size = min(limit, max(256, 1 << max(positions - 1, 1).bit_length()))
            with torch.inference_mode(False):  # a normal tensor even when first built during generation
                self._rope_cache = rope_cos_sin_cache(self.config, size)
        return self._rope_cache

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def rope(self, start_pos: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] for positions [start_pos, start_pos + length)."""
        table = self.rope_cache(start_pos + length)
        cos_sin = table[start_pos:start_pos + length].to(device)
        return cos_sin.chunk(2, dim=-1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, H]
        return self.model.embed_tokens(input_ids)

    def run_layers(self, x: torch.Tensor, start: int, end: int, start_pos: int = 0,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Layers [start, end) over x [B, T, H] at positions [start_pos, start_pos + T) -> [B, T, H]."""
        cos, sin = self.rope(start_pos, x.shape[1], x.device)
        for i in range(start, end):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x = self.model.layers[i](x, cos, sin, layer_cache, start_pos)
        return x

    def exit_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Residual state after some layer [..., H] -> logits through the final norm and LM head [..., V]."""
        return self.lm_head(self.model.norm(x))

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, T] -> L + 1 residual states [B, T, H]: the embeddings, then the output of each layer."""
        states = [self.embed(input_ids)]
        cos, sin = self.rope(0, input_ids.shape[1], input_ids.device)
        for layer in self.model.layers:
            states.append(layer(states[-1], cos, sin))
        return states

    def forward(self, input_ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """[B, T] -> logits [B, T, V] of exit `exit_layer` (1..L; default L, the full model)."""
        exit_layer = self.num_layers if exit_layer is None else exit_layer
        if not 1 <= exit_layer <= self.num_layers:
            raise LayerSkipError(f"exit_layer must be in [1, {self.num_layers}], got {exit_layer}")
        x = self.run_layers(self.embed(input_ids), 0, exit_layer)
        return self.exit_logits(x)
