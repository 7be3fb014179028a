"""`generate()`: one entry point for every strategy and backend."""
from __future__ import annotations

import torch

from . import engine as _engine
from .errors import LayerSkipError
from .generation import GenerationResult, check_generation_args
from .model import LayerSkipModel
from .reference_generate import generate_reference

BACKENDS = ("auto", "engine", "reference")


def generate(model: LayerSkipModel, prompt, max_new_tokens: int = 64, strategy: str = "autoregressive",
             exit_layer: int | None = None, num_speculations: int | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
             on_token=None, backend: str = "auto", context_length: int | None = None,
             weight_dtype: torch.dtype | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after `prompt` (a string or a list of token ids).

    strategy: "autoregressive" (all layers), "early_exit" (layers [0, exit_layer) then the LM head) or
    "self_speculative" (layers [0, exit_layer) draft `num_speculations` tokens, the rest verify; the output
    is the full model's: identical tokens when greedy, the same distribution when sampling).
    temperature 0 is greedy; otherwise top_k (0 = off) and top_p filter, and `seed` fixes the draws.
    stop_token_ids: None stops at the model's EOS ids, [] never stops early.
    on_token: called with each new token id as soon as it is accepted.
    backend: "engine" (C++ decoder loop), "reference" (pure PyTorch oracle) or "auto" (engine when built).
    weight_dtype: the engine's matmul weights, torch.float32 or torch.bfloat16 (None: bfloat16 for a
    bfloat16 model, else float32). The reference always runs in the model's dtype.
    """
    if not isinstance(model, LayerSkipModel):
        raise TypeError(f"model must be a LayerSkipModel from layerskip_ext.load(), got {type(model).__name__}")
    if backend not in BACKENDS:
        raise LayerSkipError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if context_length is None:
        context_length = model.config.max_position_embeddings
    elif context_length > model.config.max_position_embeddings:
        raise LayerSkipError(f"context_length {context_length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    args = check_generation_args(model.config, model.tokenizer, prompt, max_new_tokens=max_new_tokens,
                                 strategy=strategy, exit_layer=exit_layer, num_speculations=num_speculations,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 stop_token_ids=stop_token_ids, context_length=context_length)
    if on_token is not None and not callable(on_token):
        raise TypeError("on_token must be callable")
    if backend == "reference" or (backend == "auto" and not _engine.is_available()):
        return generate_reference(model.module, args, decode=model.decode, on_token=on_token)
    return _engine.get_engine(model, weight_dtype).generate(args, on_token=on_token)
