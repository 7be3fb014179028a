"""Layer dropout (LayerSkip section 4.1): at training step t of T, layer l is skipped per sample with probability
p_{l,t} = p_max * S(l / (L-1)) * C(t / T).

S is a schedule on [0, 1] with S(0) = 0 and S(1) = 1 (except "uniform", which is 1 everywhere), so the rates grow
with depth. C is the paper's curriculum over training time: "constant" (1; the paper's choice for continual
pretraining and fine-tuning), "exp" (2^(t/T) - 1, from 0 up to 1 at the end; its choice for pretraining from
scratch, so the young network is not starved of depth) or "linear" (t/T).

Which samples skip is a pure function of (seed, step, layer, global sample index) through the project's
counter-based RNG, so a run is reproducible, resumable, and each DDP rank draws for its own samples.
"""
from __future__ import annotations

import math

import torch

from layerskip_ext.sampling import uniform_from_counter

SCHEDULES = ("uniform", "linear", "exp", "log", "sine", "sigmoid", "step")
TIME_SCHEDULES = ("constant", "exp", "linear")


def schedule_value(schedule: str, x: float) -> float:
    """S(x) for x in [0, 1]."""
    if schedule == "uniform":
        return 1.0
    if schedule == "linear":
        return x
    if schedule == "exp":  # 2^x - 1, already 0 at 0 and 1 at 1
        return 2.0 ** x - 1.0
    if schedule == "log":  # log2(1 + x)
        return math.log2(1.0 + x)
    if schedule == "sine":
        return math.sin(0.5 * math.pi * x)
    if schedule == "sigmoid":  # logistic centred at 0.5, slope 10, rescaled to S(0) = 0, S(1) = 1
        sig = lambda v: 1.0 / (1.0 + math.exp(-10.0 * (v - 0.5)))  # noqa: E731
        return (sig(x) - sig(0.0)) / (sig(1.0) - sig(0.0))
    if schedule == "step":  # the deeper half of the network only
        return 1.0 if x >= 0.5 else 0.0
    raise ValueError(f"layer dropout schedule must be one of {SCHEDULES}, got {schedule!r}")


def time_factor(time_schedule: str, step: int, total_steps: int) -> float:
    """C(t / T) at `step` of `total_steps`."""
    if time_schedule not in TIME_SCHEDULES:
        raise ValueError(f"layer dropout time schedule must be one of {TIME_SCHEDULES}, got {time_schedule!r}")
    if time_schedule == "constant":
        return 1.0
    x = min(max(step / total_steps, 0.0), 1.0)
    return 2.0 ** x - 1.0 if time_schedule == "exp" else x


def layer_dropout_rates(num_layers: int, p_max: float, schedule: str = "exp",
                        layers: list[int] | None = None) -> list[float]:
    """Per-layer skip probabilities [L]; `layers` (0-based) restricts dropout to those layers (others get 0)."""
    if not 0.0 <= p_max <= 1.0:
        raise ValueError(f"layer dropout p_max must be in [0, 1], got {p_max}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer dropout layers {bad} out of range [0, {num_layers})")
    rates = []
    for l in range(num_layers):
        x = l / (num_layers - 1) if num_layers > 1 else 1.0
        on = layers is None or l in layers
        rates.append(p_max * schedule_value(schedule, x) if on else 0.0)
    return rates


class LayerDropout:
    """Draws, per training step, which samples skip which layers.

    skip[l, b] = uniform_from_counter(seed, (draw * L + l) * global_batch + rank * B + b) < p_{l,t},
    with draw = step * grad_accum + micro (each micro-batch draws anew) and p_{l,t} = rates[l] * C(step / T).
    """

    def __init__(self, num_layers: int, p_max: float, schedule: str = "exp", layers: list[int] | None = None,
                 seed: int = 0, time_schedule: str = "constant", total_steps: int = 1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        time_factor(time_schedule, 0, total_steps)  # validates the name
        self.rates = layer_dropout_rates(num_layers, p_max, schedule, layers)
        self.num_layers, self.seed = num_layers, seed
        self.time_schedule, self.total_steps = time_schedule, total_steps

    @property
    def active(self) -> bool:
        return any(p > 0 for p in self.rates)

    def rates_at(self, step: int) -> list[float]:
        """[L] skip probabilities at training step `step`."""
        c = time_factor(self.time_schedule, step, self.total_steps)
        return [p * c for p in self.rates]

    def skip_mask(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, micro: int = 0,
                  grad_accum: int = 1) -> torch.Tensor:
        """[L, B] bool: True where sample b of micro-batch `micro` skips layer l at this step."""
        global_batch = batch_size * world_size
        draw = step * grad_accum + micro
        mask = torch.zeros(self.num_layers, batch_size, dtype=torch.bool)
        for l, p in enumerate(self.rates_at(step)):
            if p <= 0:
                continue
            base = (draw * self.num_layers + l) * global_batch + rank * batch_size
            for b in range(batch_size):
                mask[l, b] = uniform_from_counter(self.seed, base + b) < p
        return mask
