"""ModelConfig: the Llama hyper-parameters layerskip_ext needs, read from and written to HF config.json.

Every field is checked for type and range when a config is built (ConfigError naming the field). Sizes have
upper bounds (LIMITS) far above any real Llama, so that a hostile config cannot make the loader allocate
without bound before a single tensor is read.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .validation import as_float, as_int

# the largest value accepted for each size (Llama 3.1 405B: 126 layers, hidden 16384, intermediate 53248,
# vocab 128256, 131072 positions)
LIMITS = {
    "num_layers": 1024,
    "hidden_size": 1 << 16,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 1024,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 21,
}
MAX_PARAMETERS = 1 << 40  # a config implying more parameters than this is refused
# errors name the config.json key of a field
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}


def _int_field(name: str, value, low: int = 1) -> int:
    v = as_int(value)
    high = LIMITS.get(name)
    name = _HF_KEYS.get(name, name)
    if v is None or v < low or (high is not None and v > high):
        bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"config: {name} must be {bound}, got {value!r}", name)
    return v


def _float_field(name: str, value, low: float, high: float = math.inf, low_open: bool = True) -> float:
    v = as_float(value)
    if v is None or not math.isfinite(v) or not (v > low if low_open else v >= low) or not v <= high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
        raise ConfigError(f"config: {name} must be a finite number in {interval}, got {value!r}", name)
    return v


# RoPE scalings computed exactly: "linear" divides every frequency by `factor`; "dynamic" (NTK) changes the base
# only for sequences longer than max_position_embeddings (transformers' rule), which no context here reaches, so
# within our contexts it is the plain RoPE; "llama3" rescales frequencies by wavelength. Others are refused.
ROPE_SCALINGS = ("linear", "dynamic", "llama3")


def _check_rope_scaling(scaling, max_positions: int) -> dict | None:
    """None, or a linear / dynamic / llama3 rope_scaling dict with every value in range (the formulas divide by
    them); ConfigError naming the key for anything else (an unknown type is never silently ignored). A llama3
    scaling without original_max_position_embeddings takes max_positions, as transformers 5 does."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config: rope_scaling must be an object or null, got {scaling!r}", "rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS + ("default",):
        raise ConfigError(f"config: unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_SCALINGS)})",
                          "rope_scaling")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:  # transformers' Llama rotates every dimension in plain RoPE but not in its scalings
        raise ConfigError(f"config: rope_scaling.partial_rotary_factor {partial!r} is not supported (only 1.0: "
                          "every head dimension rotated)", "rope_scaling")
    if kind == "default":
        return dict(scaling)
    if "factor" not in scaling:
        raise ConfigError(f"config: rope_scaling of type {kind} needs 'factor'", "rope_scaling.factor")
    if kind in ("linear", "dynamic"):
        factor = _float_field("rope_scaling.factor", scaling["factor"], 0.0, 1e6)
        return dict(scaling, factor=factor)
    factor = _float_field("rope_scaling.factor", scaling["factor"], 1.0, 1e6, low_open=False)
    low = _float_field("rope_scaling.low_freq_factor", scaling.get("low_freq_factor", 1.0), 0.0, 1e6)
    high = _float_field("rope_scaling.high_freq_factor", scaling.get("high_freq_factor", 4.0), 0.0, 1e6)
    if not high > low:
        raise ConfigError(f"config: rope_scaling.high_freq_factor ({high}) must exceed low_freq_factor ({low})",
                          "rope_scaling.high_freq_factor")
    old = _int_field("rope_scaling.original_max_position_embeddings",
                     scaling.get("original_max_position_embeddings", max_positions))
    return dict(scaling, factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=old)


def _check_architecture(d: dict) -> None:
    """Refuses config.json settings that would make a Llama compute something other than what we run: another
    activation than SiLU, biases in the attention or MLP projections (ConfigError naming the key)."""
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN: both are x * sigmoid(x)
        raise ConfigError(f"config: hidden_act {act!r} is not supported (layerskip_ext runs SwiGLU: 'silu')",
                          "hidden_act")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False) not in (False, None):
            raise ConfigError(f"config: {key} {d[key]!r} is not supported (layerskip_ext runs Llama projections "
                              "without biases)", key)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # normalise fields of the frozen dataclass
        for name in LIMITS:  # numpy / torch integers become Python ints
            set_(name, _int_field(name, getattr(self, name)))
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(f"config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads}) (config.json: num_attention_heads, num_key_value_heads)",
                              "num_key_value_heads")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}",
                              "head_dim")
        H, D, I, V = self.hidden_size, self.head_dim, self.intermediate_size, self.vocab_size
        per_layer = 2 * H * (self.num_heads + self.num_kv_heads) * D + 3 * H * I + 2 * H
        parameters = self.num_layers * per_layer + (1 if self.tie_word_embeddings else 2) * V * H + H
        if parameters > MAX_PARAMETERS:
            raise ConfigError(f"config: the sizes imply {parameters:.3g} parameters, more than the limit of "
                              f"{MAX_PARAMETERS:.3g}", "num_hidden_layers")
        set_("rope_theta", _float_field("rope_theta", self.rope_theta, 0.0))
        set_("rms_norm_eps", _float_field("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0))
        set_("rope_scaling", _check_rope_scaling(self.rope_scaling, self.max_position_embeddings))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}",
                              "tie_word_embeddings")
        if self.bos_token_id is not None:
            set_("bos_token_id", _int_field("bos_token_id", self.bos_token_id, low=0))
            if self.bos_token_id >= V:
                raise ConfigError(f"config: bos_token_id {self.bos_token_id} is outside the vocabulary of size {V}",
                                  "bos_token_id")
        if not isinstance(self.eos_token_ids, (tuple, list)):
            raise ConfigError(f"config: eos_token_ids must be a sequence of token ids, got {self.eos_token_ids!r}",
                              "eos_token_id")
        eos = tuple(_int_field("eos_token_id", t, low=0) for t in self.eos_token_ids)
        for t in eos:
            if t >= V:
                raise ConfigError(f"config: eos_token_id {t} is outside the vocabulary of size {V}", "eos_token_id")
        set_("eos_token_ids", eos)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face LlamaConfig dictionary (config.json). Raises ConfigError naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"unsupported model_type {model_type!r}: layerskip_ext loads Llama models "
                              "(model_type 'llama')", "model_type")
        _check_architecture(d)
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ConfigError(f"config.json is missing the required key {key!r}", key)
        hidden = _int_field("hidden_size", d["hidden_size"])
        heads = _int_field("num_heads", d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_parameters = d.get("rope_parameters")  # transformers >= 5 nests theta and scaling here
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
        if kind == "default":
            rope_scaling = None
        if kind == "llama3" and d.get("original_max_position_embeddings") is not None:
            # transformers 5 gives a top-level original_max_position_embeddings priority over the scaling's own
            rope_scaling = dict(rope_scaling, original_max_position_embeddings=d["original_max_position_embeddings"])
        partial = d.get("partial_rotary_factor")
        if partial is not None and partial != 1.0:  # transformers moves it into the RoPE parameters
            raise ConfigError(f"config: partial_rotary_factor {partial!r} is not supported (only 1.0: every head "
                              "dimension rotated)", "partial_rotary_factor")
        kv_heads = d.get("num_key_value_heads")
        head_dim = d.get("head_dim")
        return cls(
            num_layers=d["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=hidden // heads if head_dim is None else head_dim,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rope_theta=10000.0 if rope_theta is None else rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dictionary that transformers' LlamaForCausalLM reads."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return d

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
