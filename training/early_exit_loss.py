"""Early-exit loss (LayerSkip section 4.2): every enabled exit goes through the model's own final norm and LM head.

loss = sum_l scale_l * CE(lm_head(norm(x_l)), labels), with scale_l from the per-layer rule, multiplied by
e_scale for every exit but the last layer, and normalised so the scales of the enabled exits sum to 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SCALE_TYPES = ("uniform", "l", "sum_l", "sqrt_l", "inv_l", "inv_sqrt_l")
IGNORE_INDEX = -100


def _raw_scale(scale_type: str, depth: int) -> float:
    """Unnormalised scale of the exit after `depth` layers (depth = layer index + 1)."""
    if scale_type == "uniform":
        return 1.0
    if scale_type == "l":
        return float(depth)
    if scale_type == "sum_l":  # 1 + 2 + ... + depth
        return depth * (depth + 1) / 2.0
    if scale_type == "sqrt_l":
        return math.sqrt(depth)
    if scale_type == "inv_l":
        return 1.0 / depth
    if scale_type == "inv_sqrt_l":
        return 1.0 / math.sqrt(depth)
    raise ValueError(f"early-exit scale must be one of {SCALE_TYPES}, got {scale_type!r}")


def check_exit_layers(exit_layers, num_layers: int) -> None:
    """0-based exit layers must be integers in [0, num_layers) (a float such as 0.5 matched no layer: dropped)."""
    bad = [l for l in exit_layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} out of range: exits are integers in [0, {num_layers})")


def loss_scales(exit_layers: list[int], num_layers: int, scale_type: str = "l", e_scale: float = 1.0) -> list[float]:
    """Normalised weights of the exits `exit_layers` (0-based layer indices, exit after that layer)."""
    if not exit_layers:
        raise ValueError("early-exit loss needs at least one exit layer")
    if not isinstance(e_scale, (int, float)) or isinstance(e_scale, bool) or not 0 <= e_scale < math.inf:
        raise ValueError(f"e_scale must be a finite number >= 0, got {e_scale!r}")
    check_exit_layers(exit_layers, num_layers)
    raw = [_raw_scale(scale_type, l + 1) * (1.0 if l == num_layers - 1 else e_scale) for l in exit_layers]
    total = sum(raw)
    if total <= 0:
        raise ValueError("early-exit scales sum to 0 (e_scale 0 with no final-layer exit)")
    return [r / total for r in raw]


def exit_cross_entropy(hidden: torch.Tensor, norm, lm_head, labels: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], labels [B, T] (IGNORE_INDEX masked) -> mean CE over the labelled tokens (fp32 scalar)."""
    logits = lm_head(norm(hidden))  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def early_exit_loss(hidden_by_layer: dict[int, torch.Tensor], norm, lm_head, labels: torch.Tensor, num_layers: int,
                    scale_type: str = "l", e_scale: float = 1.0, recompute: bool = False):
    """Combined loss over the given exits -> (loss scalar, {layer: CE (detached)}).

    hidden_by_layer: {layer index: residual stream after that layer [B, T, H]} for the exits enabled this step.
    Exits are unembedded one at a time; with `recompute` each exit's logits [B, T, V] are recomputed in the
    backward pass instead of being kept, so memory holds one exit's logits at a time.
    """
    layers = sorted(hidden_by_layer)
    scales = loss_scales(layers, num_layers, scale_type, e_scale)
    for layer in layers:
        h = hidden_by_layer[layer]
        if h.dim() != 3 or tuple(h.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"exit {layer}: hidden states must be [B, T, H] with labels [B, T], got "
                             f"{tuple(h.shape)} and {tuple(labels.shape)}")
    total, per_exit = 0.0, {}
    for layer, scale in zip(layers, scales):
        h = hidden_by_layer[layer]
        if recompute and torch.is_grad_enabled():
            ce = checkpoint(exit_cross_entropy, h, norm, lm_head, labels, use_reentrant=False)
        else:
            ce = exit_cross_entropy(h, norm, lm_head, labels)
        per_exit[layer] = ce.detach()
        total = total + scale * ce
    return total, per_exit
