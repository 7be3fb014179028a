"""Runs the decoder layers of either model kind one by one, so training can skip layers and read every exit.

Two kinds share one module tree (model.embed_tokens, model.layers, model.norm, lm_head):
  "hf"        transformers LlamaForCausalLM (its own decoder layers, rotary module and attention are called);
  "reference" layerskip_ext.reference.ReferenceLlama.
Nothing is forked: `LayerSkipLM` calls the model's own layers, norm and head, and only drives the loop.
"""
from __future__ import annotations

import torch
from torch import nn

from layerskip_ext.config import ModelConfig
from layerskip_ext.reference import ReferenceLlama

from .early_exit_loss import early_exit_loss

KINDS = ("hf", "reference")


def model_kind(lm: nn.Module) -> str:
    if isinstance(lm, ReferenceLlama):
        return "reference"
    if type(lm).__name__ == "LlamaForCausalLM":
        return "hf"
    raise TypeError("expected a transformers LlamaForCausalLM or a layerskip_ext ReferenceLlama, "
                    f"got {type(lm).__name__}")


def model_config(lm: nn.Module) -> ModelConfig:
    """The layerskip_ext ModelConfig of either kind."""
    if model_kind(lm) == "reference":
        return lm.config
    return ModelConfig.from_hf_dict(lm.config.to_dict())


def build_hf(config: ModelConfig) -> nn.Module:
    """A randomly initialised transformers LlamaForCausalLM with `config` (sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_config)


def to_reference(lm: nn.Module) -> ReferenceLlama:
    """The same weights as a ReferenceLlama (shared tensors for the reference kind, copies for HF)."""
    if model_kind(lm) == "reference":
        return lm
    config = model_config(lm)
    ref = ReferenceLlama(config)
    state = {k: v for k, v in lm.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    ref.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref.to(lm.lm_head.weight.dtype).eval()


class LayerRunner:
    """Calls layer i of `lm` on x [B, T, H] (positions 0..T-1, causal) with the model's own code."""

    def __init__(self, lm: nn.Module, seq_len: int, device):
        self.lm, self.kind = lm, model_kind(lm)
        if self.kind == "reference":
            self.cos, self.sin = lm.rope(0, seq_len, device)  # [T, D/2] each
        else:
            self.position_ids = torch.arange(seq_len, device=device)[None]  # [1, T]
            dummy = torch.zeros(1, seq_len, lm.config.hidden_size, device=device, dtype=lm.lm_head.weight.dtype)
            self.position_embeddings = lm.model.rotary_emb(dummy, self.position_ids)  # ([1, T, D], [1, T, D])
            self.mask = None  # sdpa: causal when no mask is given
            if lm.config._attn_implementation != "sdpa":
                upper = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
                self.mask = torch.zeros(seq_len, seq_len, device=device).masked_fill(upper, float("-inf"))[None, None]

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.lm.model.layers[i]
        if self.kind == "reference":
            return layer(x, self.cos, self.sin)
        out = layer(x, attention_mask=self.mask, position_ids=self.position_ids,
                    position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple


def residual_states(lm: nn.Module, input_ids: torch.Tensor, keep: set[int] | None = None,
                    skip: torch.Tensor | None = None, num_layers: int | None = None) -> dict[int, torch.Tensor]:
    """Runs layers [0, num_layers) over input_ids [B, T] -> {layer index: residual after it [B, T, H]} for `keep`.

    skip [L, B] bool: sample b bypasses layer l (layer dropout); only the kept samples are computed.
    """
    B, T = input_ids.shape
    L = len(lm.model.layers) if num_layers is None else num_layers
    run = LayerRunner(lm, T, input_ids.device)
    x = lm.model.embed_tokens(input_ids)  # [B, T, H]
    out = {}
    for l in range(L):
        if skip is not None and bool(skip[l].any()):
            kept = (~skip[l]).nonzero().squeeze(1)  # [B'] indices of samples that run layer l
            if kept.numel() > 0:
                x = x.index_copy(0, kept, run(l, x.index_select(0, kept)))  # [B, T, H]
        else:
            x = run(l, x)
        if keep is None or l in keep:
            out[l] = x
    return out


class LayerSkipLM(nn.Module):
    """Training wrapper: forward(input_ids, labels, exits, skip) -> (loss, {exit layer: CE}). DDP wraps this."""

    def __init__(self, lm: nn.Module, scale_type: str = "l", e_scale: float = 1.0, recompute: bool = False):
        super().__init__()
        model_kind(lm)
        self.lm, self.scale_type, self.e_scale, self.recompute = lm, scale_type, e_scale, recompute

    @property
    def num_layers(self) -> int:
        return len(self.lm.model.layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, exits: list[int],
                skip: torch.Tensor | None = None):
        """input_ids, labels [B, T]; exits: 0-based exit layers with a loss (the last layer for plain training)."""
        hidden = residual_states(self.lm, input_ids, keep=set(exits), skip=skip)
        return early_exit_loss(hidden, self.lm.model.norm, self.lm.lm_head, labels, self.num_layers,
                               self.scale_type, self.e_scale, self.recompute)
