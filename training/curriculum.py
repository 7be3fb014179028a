"""Early-exit curricula (LayerSkip section 4.2.2): which exits carry a loss at a given training step.

Each is a pure function of the step (so a resumed run picks up the same schedule). The last layer's exit is
always enabled; the curricula choose among the other `exit_layers`.
"""
from __future__ import annotations

import math

from .early_exit_loss import check_exit_layers

CURRICULA = ("none", "rotational", "gradual")


class EarlyExitCurriculum:
    """exit_layers: 0-based candidate exits (the last layer is added if missing).

    none:       every candidate exit at every step.
    rotational: the early exits at positions i (in sorted order) with i % period == step % period.
    gradual:    early exits enabled from the deepest to the shallowest: at step t the deepest
                floor(t * (k + 1) / (span * total_steps)) of the k early exits, so one more every
                span * total_steps / (k + 1) steps and all of them from step k * span * total_steps / (k + 1) on
                (span 1: the whole run, the last exit switched on for the last 1/(k+1); span 0.5: by mid-run).
    """

    def __init__(self, kind: str, exit_layers: list[int], num_layers: int, period: int = 2, total_steps: int = 1,
                 gradual_span: float = 1.0):
        if kind not in CURRICULA:
            raise ValueError(f"early-exit curriculum must be one of {CURRICULA}, got {kind!r}")
        check_exit_layers(exit_layers, num_layers)
        if period < 1:
            raise ValueError(f"rotational period must be >= 1, got {period}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 < gradual_span <= 1.0:
            raise ValueError(f"gradual_span must be in (0, 1], got {gradual_span}")
        self.kind, self.num_layers, self.period, self.total_steps = kind, num_layers, period, total_steps
        self.gradual_span = gradual_span
        self.early = sorted(set(l for l in exit_layers if l != num_layers - 1))

    def enabled(self, step: int) -> list[int]:
        """Sorted 0-based exit layers with a loss at `step` (always ends with the last layer)."""
        last = [self.num_layers - 1]
        if self.kind == "none":
            return self.early + last
        if self.kind == "rotational":
            return [l for i, l in enumerate(self.early) if i % self.period == step % self.period] + last
        k = len(self.early)
        n = min(k, math.floor(step * (k + 1) / (self.gradual_span * self.total_steps) + 1e-9))
        return self.early[k - n:] + last
