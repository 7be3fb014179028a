"""The adaptive drafting policy of self-speculative decoding: a line-for-line mirror of csrc/engine/draft_policy.h.

The header's comment is the statement of the policy (modes, updates, random counters); this module must make
the same decisions from the same counts, so every state quantity is an integer in fixed point (1.0 == ONE)
with truncating division of non-negative numbers, exactly as in C++.
"""
from __future__ import annotations

from dataclasses import dataclass

ONE = 1 << 16  # fixed-point 1.0
EMA_KEEP = 3  # new = (EMA_KEEP * old + x) / (EMA_KEEP + 1)
DEFAULT_PROBE_INTERVAL = 32


@dataclass
class Params:
    max_length: int = 1  # num_speculations: the longest round
    threshold: float = 0.0  # stop drafting below this top probability (0: never)
    adaptive: bool = False  # adapt the length and switch drafting off when it does not pay
    draft_cost: int = 0  # cost of a draft step / cost of a full decode step, fixed point
    probe_interval: int = DEFAULT_PROBE_INTERVAL  # plain tokens before the next probe round


@dataclass
class State:
    length: int = 1  # drafts of the next round
    acceptance: int = ONE  # EMA of accepted / drafted per round, fixed point (starts optimistic)
    plain_left: int = 0  # > 0: plain decoding for this many more tokens


def initial_state(p: Params) -> State:
    return State(length=p.max_length)


def speculating(s: State) -> bool:
    return s.plain_left == 0


def keep_draft(p: Params, top_probability: float) -> bool:
    """True while a draft step's token is kept: its top probability reaches the threshold."""
    return top_probability >= p.threshold


def layer_weights(hidden: int, q_size: int, kv_size: int, intermediate: int) -> int:
    """Weights one decoder layer reads (q, k, v, o, gate, up, down, two norms): its cost unit."""
    return hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * intermediate + 2 * hidden


def draft_cost(exit_layer: int, num_layers: int, layer: int, hidden: int, draft_head_rows: int, vocab: int) -> int:
    """Cost of a draft step (E layers + a head of draft_head_rows rows) over a full step, fixed point."""
    draft = exit_layer * layer + draft_head_rows * hidden + hidden
    full = num_layers * layer + vocab * hidden + hidden
    return draft * ONE // full


def model_draft_cost(config, exit_layer: int, draft_head_rows: int | None = None) -> int:
    """draft_cost for a ModelConfig (the engine computes the same from its shape)."""
    layer = layer_weights(config.hidden_size, config.num_heads * config.head_dim,
                          config.num_kv_heads * config.head_dim, config.intermediate_size)
    rows = config.vocab_size if draft_head_rows is None else draft_head_rows
    return draft_cost(exit_layer, config.num_layers, layer, config.hidden_size, rows, config.vocab_size)


def pays(p: Params, acceptance: int) -> bool:
    """Whether some round length k in [1, max_length] yields more tokens (1 + a + ... + a^k) than it costs
    in full steps (1 + k * draft_cost)."""
    power, tokens = ONE, ONE
    for k in range(1, p.max_length + 1):
        power = power * acceptance // ONE
        tokens += power
        if tokens > ONE + k * p.draft_cost:
            return True
        if power == 0:
            break
    return False


def after_round(p: Params, s: State, k: int, a: int) -> None:
    """After a round of k drafts of which a were accepted."""
    if not p.adaptive:
        return
    x = a * ONE // k if k > 0 else 0
    s.acceptance = (EMA_KEEP * s.acceptance + x) // (EMA_KEEP + 1)
    if k > 0:
        s.length = min(s.length + 1, p.max_length) if a == k else min(a + 1, p.max_length)
    if not pays(p, s.acceptance):
        s.plain_left = p.probe_interval


def after_plain_token(s: State) -> None:
    if s.plain_left > 0:
        s.plain_left -= 1
