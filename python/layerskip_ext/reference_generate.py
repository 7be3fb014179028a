"""The three decoding strategies on the pure-PyTorch reference model (batch 1), and their batched semantics.

Batched generation is defined as independent batch-1 generations: row i of a batch yields exactly the tokens
of `generate_reference` on prompt i with row i's arguments, whatever the other rows are
(`generate_reference_batch` states it literally). The C++ engine, which runs rows together, is checked
against it.

- autoregressive: every token through all L layers.
- early_exit: every token through layers [0, E), then the final norm and LM head.
- self_speculative: layers [0, E) draft up to d tokens; layers [E, L) verify them in one pass starting
  from the cached layer-E states (the exit-query cache) and reusing the KV entries the draft wrote.

Random draws follow a running counter (one per sampled token; d + 2d + 1 per speculative round) so the
C++ engine, which uses the same counters, reproduces seeded generations token for token. The adaptive drafting
policy (confidence threshold, adaptive length, switching drafting off) is draft_policy.py, the mirror of the
engine's csrc/engine/draft_policy.h.
"""
from __future__ import annotations

import time

import torch

from .generation import GenerationArgs, GenerationResult, GenerationStats
from . import draft_policy
from .reference import KVCache, ReferenceLlama
from .sampling import sample, sample_from_probs, sampling_probs, speculative_accept, speculative_accept_greedy


class _Output:
    """Collects new tokens and decides when to stop."""

    def __init__(self, args: GenerationArgs, on_token):
        self.args, self.on_token = args, on_token
        self.tokens: list[int] = []
        self.finish_reason: str | None = None if args.max_new_tokens > 0 else "length"

    def push(self, token: int) -> bool:
        """Appends one token; returns True when generation must stop."""
        self.tokens.append(token)
        if self.on_token is not None and self.on_token(token):  # the caller stops here (a stop string)
            self.finish_reason = "stop"
        elif token in self.args.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.args.max_new_tokens:
            self.finish_reason = "length"
        elif len(self.args.prompt_ids) + len(self.tokens) >= self.args.context_length:
            self.finish_reason = "context"
        return self.finish_reason is not None


@torch.inference_mode()
def generate_reference(model: ReferenceLlama, args: GenerationArgs, decode=None, on_token=None) -> GenerationResult:
    """Runs one generation with the reference model. `decode(ids) -> str` turns tokens into text."""
    L = model.num_layers
    E = args.exit_layer if args.strategy != "autoregressive" else L
    prompt = args.prompt_ids
    # room for the prompt, the new tokens and one verify block past the last accepted token
    capacity = min(args.context_length, len(prompt) + args.max_new_tokens + args.num_speculations + 1)
    param = next(model.parameters())
    cache = KVCache(model.config, 1, capacity, param.dtype, param.device)
    stats = GenerationStats(args.strategy, None if args.strategy == "autoregressive" else E,
                            args.num_speculations if args.strategy == "self_speculative" else None,
                            prompt_tokens=len(prompt))
    out = _Output(args, on_token)
    counter = 0  # next random draw
    policy = policy_params(model.config, args)
    policy_state = draft_policy.initial_state(policy)

    def pick(logits):  # logits [T, V] -> first row's token, advancing the draw counter
        nonlocal counter
        token = int(sample(logits, args.temperature, args.top_k, args.top_p, args.seed, counter)[0])
        counter += 1
        return token

    # prefill: the prompt through the layers this strategy uses; the first new token from its last row
    t0 = time.perf_counter()
    if out.finish_reason is None:
        ids = torch.tensor([prompt], device=param.device)
        prefill_layers = E if args.strategy == "early_exit" else L
        x = model.run_layers(model.embed(ids), 0, prefill_layers, 0, cache)  # [1, P, H]
        out.push(pick(_finite(model.exit_logits(x[0, -1:]), "the prefill")))
    t1 = time.perf_counter()
    stats.prefill_time_s = t1 - t0

    position = len(prompt)  # position of the last new token, which no layer has processed yet
    while out.finish_reason is None:
        if args.strategy == "self_speculative" and draft_policy.speculating(policy_state):
            position, drafted, accepted = _speculative_round(model, args, cache, position, out, stats, counter,
                                                             policy, policy_state.length)
            counter += 3 * drafted + 1  # d draft draws, then 2d + 1 for acceptance
            draft_policy.after_round(policy, policy_state, drafted, accepted)
        else:  # autoregressive, early exit, or a self-speculative row decoding plainly (all L layers)
            layers = L if args.strategy == "self_speculative" else E
            ids = torch.tensor([[out.tokens[-1]]], device=param.device)
            x = model.run_layers(model.embed(ids), 0, layers, position, cache)  # [1, 1, H]
            out.push(pick(_finite(model.exit_logits(x[0]), "a decode step")))
            position += 1
            draft_policy.after_plain_token(policy_state)
    stats.decode_time_s = time.perf_counter() - t1
    stats.new_tokens = len(out.tokens)
    text = decode(out.tokens) if decode is not None else ""
    return GenerationResult(out.tokens, text, stats, out.finish_reason, list(prompt))


def generate_reference_batch(model: ReferenceLlama, args_list: list[GenerationArgs], decode=None,
                             on_token=None) -> list[GenerationResult]:
    """One batch-1 generation per row, in row order; on_token(row, token)."""
    results = []
    for row, args in enumerate(args_list):
        callback = None if on_token is None else (lambda token, row=row: on_token(row, token))
        try:
            results.append(generate_reference(model, args, decode=decode, on_token=callback))
        except NonFiniteLogits as e:  # as the engine reports a row whose logits went bad
            raise RuntimeError(f"generation of row {row} failed: {e} (the model produced NaN or infinite logits)") \
                from None
    return results


class NonFiniteLogits(RuntimeError):
    """Logits with a NaN or without a finite maximum: a broken model (what the engine's ops refuse)."""


def _finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    """logits [T, V] unchanged, or NonFiniteLogits: greedy decoding would pick the argmax of NaN as a token."""
    if torch.isnan(logits).any() or not torch.isfinite(logits.amax(-1)).all():
        raise NonFiniteLogits(f"non-finite logits in {where}")
    return logits


def policy_params(config, args: GenerationArgs) -> draft_policy.Params:
    """The drafting policy's parameters of one generation (the engine builds the same in add_row /
    set_row_policy)."""
    spec = args.strategy == "self_speculative"
    return draft_policy.Params(
        max_length=args.num_speculations if spec else 1, threshold=args.draft_threshold, adaptive=args.adaptive,
        draft_cost=draft_policy.model_draft_cost(
            config, args.exit_layer, None if args.draft_vocab is None else len(args.draft_vocab)) if spec else 0,
        probe_interval=args.probe_interval)


def _speculative_round(model, args, cache, position, out, stats, counter, policy, length) -> tuple[int, int, int]:
    """One draft / verify / accept round of at most `length` drafts.

    Returns the position of the new last (unprocessed) token, the number of tokens drafted and accepted."""
    L, E, device = model.num_layers, args.exit_layer, cache.keys[0].device
    remaining = args.max_new_tokens - len(out.tokens)
    # the verify block covers positions [position, position + d]: keep it inside the cache
    d = max(0, min(length, remaining, cache.capacity - position - 1))
    greedy = args.temperature == 0
    vocab = None if args.draft_vocab is None else torch.tensor(args.draft_vocab, device=device)  # [K] or None

    # 1. draft: up to d tokens, each through layers [0, E) + norm + head; keep their layer-E states. Step d
    # only runs the last draft token through layers [0, E), so that the verifier can score one bonus token; a
    # draft whose top probability is below the threshold ends the round there (draft_policy.h).
    exit_states = []  # layer-E residual states of positions [position, position + d]
    draft_tokens, draft_probs = [], []
    token = out.tokens[-1]
    for i in range(d + 1):
        x = model.run_layers(model.embed(torch.tensor([[token]], device=device)), 0, E, position + i, cache)
        exit_states.append(x)
        if i == d:
            break
        logits = _finite(model.exit_logits(x[0]), "a draft step")  # [1, V]
        if vocab is not None:  # a reduced draft head: only the draft vocabulary's rows
            logits = logits[:, vocab]  # [1, K]
        if greedy:
            token = int(logits.argmax(-1)[0])
            confidence = float(torch.softmax(logits.float(), -1).amax())
        else:
            probs = sampling_probs(logits, args.temperature, args.top_k, args.top_p)  # [1, K or V]
            token = int(sample_from_probs(probs, args.seed, counter + i)[0])
            confidence = float(probs.amax())
            if vocab is not None:  # the draft distribution is zero outside the draft vocabulary
                probs = torch.zeros(1, model.config.vocab_size, dtype=probs.dtype, device=probs.device).index_copy_(
                    1, vocab, probs)
        if vocab is not None:
            token = int(vocab[token])
        if not draft_policy.keep_draft(policy, confidence):
            d = i
            break
        if not greedy:
            draft_probs.append(probs[0])
        draft_tokens.append(token)

    # 2. verify: layers [E, L) over the d + 1 cached exit states in one pass
    h = model.run_layers(torch.cat(exit_states, dim=1), E, L, position, cache)  # [1, d + 1, H]
    target_logits = _finite(model.exit_logits(h[0]), "a verify step")  # [d + 1, V]

    # 3. accept
    drafts = torch.tensor(draft_tokens, dtype=torch.int64)
    if greedy:
        tokens, n = speculative_accept_greedy(drafts, target_logits)
    else:
        target_probs = sampling_probs(target_logits, args.temperature, args.top_k, args.top_p)
        probs_d = torch.stack(draft_probs) if d else target_probs[:0]
        tokens, n = speculative_accept(drafts, probs_d, target_probs, args.seed, counter + d)
    stats.rounds += 1
    stats.drafted += d
    for t in tokens[: n + 1].tolist():
        if out.push(t):
            break
    stats.accepted += n
    # 4. roll back: positions [position, position + n] hold accepted tokens; later slots are stale
    return position + n + 1, d, n
