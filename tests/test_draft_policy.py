"""The adaptive drafting policy (csrc/engine/draft_policy.h, mirrored by draft_policy.py).

Hand-computed decisions of the policy itself; then the engine against the reference (same tokens and
drafted / accepted / round counts) for random policies, sampling parameters and seeds, alone and in batches;
greedy self-speculation with every option on equals autoregressive decoding; and sampled output keeps the
full model's distribution (chi-square, as tests/test_engine.py does).
"""
from __future__ import annotations

import collections
import random

import pytest
import torch

import layerskip_ext
from layerskip_ext import draft_policy as dp
from layerskip_ext import engine as engine_mod
from chi_square import chi_square_limit, two_sample_chi_square
from conftest import make_hf_checkpoint

ONE = dp.ONE
PROMPT = [5, 17, 42, 7, 99, 3, 61]
TINY_PROMPT = [5, 17, 30, 7, 9, 3, 21]  # vocabulary 32
needs_engine = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")


def with_draft_vocab(model, seed: int):
    """A made-up frequency ranking of the whole vocabulary (reduced draft heads take its first K)."""
    model.draft_vocab = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    return model


@pytest.fixture(scope="module")
def random_model(random_checkpoint):
    return with_draft_vocab(layerskip_ext.load(random_checkpoint[1]), 1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """2 layers, hidden 32, vocabulary 32 (the many-seed tests)."""
    directory = tmp_path_factory.mktemp("tiny_policy")
    return with_draft_vocab(layerskip_ext.load(make_hf_checkpoint(
        directory, seed=3, std=0.25, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=32, tie_word_embeddings=True)), 2)


# ----------------------------------------------------------------------------------------------
# the policy's decisions, by hand


def test_draft_cost_by_hand(tiny_model):
    # hidden 32, q 4 x 8 = 32, kv 2 x 8 = 16, intermediate 64:
    # layer = 32 * (32 + 32) + 32 * 32 + 3 * 32 * 64 + 2 * 32 = 2048 + 1024 + 6144 + 64 = 9280
    assert dp.layer_weights(32, 32, 16, 64) == 9280
    # E = 1 of 2 layers, full head of 32 rows: draft 9280 + 1024 + 32 = 10336, full 18560 + 1024 + 32 = 19616
    assert dp.model_draft_cost(tiny_model.config, 1) == 10336 * ONE // 19616
    # a head of 8 rows: draft 9280 + 256 + 32 = 9568
    assert dp.model_draft_cost(tiny_model.config, 1, draft_head_rows=8) == 9568 * ONE // 19616


def test_pays_by_hand():
    p = dp.Params(max_length=4, adaptive=True, draft_cost=ONE // 2)
    # a = 0.5: k = 1 gives 1.5 tokens for 1.5 steps (not more), k = 2 1.75 for 2.0, ... never pays
    assert not dp.pays(p, ONE // 2)
    # a = 0.6: k = 1 gives 1.6 tokens for 1.5 steps
    assert dp.pays(p, 39322)
    assert dp.pays(p, ONE)
    assert not dp.pays(p, 0)
    # a draft at a fifth of the cost pays from a = 0.3 (1.3 > 1.2)
    assert dp.pays(dp.Params(max_length=1, draft_cost=13107), 19661)


def test_after_round_by_hand():
    p = dp.Params(max_length=4, adaptive=True, draft_cost=ONE // 2, probe_interval=5)
    s = dp.initial_state(p)
    assert (s.length, s.acceptance, s.plain_left) == (4, ONE, 0)
    dp.after_round(p, s, 4, 1)  # x = 0.25: ema = (3 * 65536 + 16384) / 4 = 53248; length 1 + 1
    assert (s.length, s.acceptance, s.plain_left) == (2, 53248, 0)
    dp.after_round(p, s, 2, 2)  # all accepted: grow by one; ema = (3 * 53248 + 65536) / 4
    assert (s.length, s.acceptance, s.plain_left) == (3, 56320, 0)
    dp.after_round(p, s, 3, 0)  # ema 42240 (0.645 still pays at k = 1: 1.645 > 1.5)
    assert (s.length, s.acceptance, s.plain_left) == (1, 42240, 0)
    dp.after_round(p, s, 1, 0)  # ema 31680 (0.483): k = 1 1.483 < 1.5, k = 2 1.717 < 2: plain for 5 tokens
    assert (s.length, s.acceptance, s.plain_left) == (1, 31680, 5)
    for left in (4, 3, 2, 1, 0):
        assert not dp.speculating(s)
        dp.after_plain_token(s)
        assert s.plain_left == left
    assert dp.speculating(s)
    dp.after_round(p, s, 0, 0)  # a round cut before its first draft: length kept, counts as acceptance 0
    assert (s.length, s.acceptance) == (1, 23760)
    fixed = dp.Params(max_length=4, adaptive=False, draft_cost=ONE // 2)
    s = dp.initial_state(fixed)
    dp.after_round(fixed, s, 4, 0)
    assert (s.length, s.acceptance, s.plain_left) == (4, ONE, 0)
    assert dp.keep_draft(dp.Params(threshold=0.3), 0.3) and not dp.keep_draft(dp.Params(threshold=0.3), 0.29)


@pytest.mark.parametrize("kwargs,message", [
    (dict(draft_threshold=1.5), "draft_threshold"), (dict(draft_threshold=float("nan")), "draft_threshold"),
    (dict(draft_threshold="0.2"), "draft_threshold"), (dict(adaptive=1), "adaptive"),
    (dict(probe_interval=0), "probe_interval"), (dict(probe_interval=2.0), "probe_interval")])
def test_bad_policy_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layerskip_ext.generate(tiny_model, TINY_PROMPT, strategy="self_speculative", exit_layer=1,
                               backend="reference", **kwargs)


# ----------------------------------------------------------------------------------------------
# engine == reference


def both(model, prompt, **kwargs):
    kwargs.setdefault("stop_token_ids", [])
    ref = layerskip_ext.generate(model, prompt, backend="reference", **kwargs)
    eng = layerskip_ext.generate(model, prompt, backend="engine", **kwargs)
    return ref, eng


def counts(result):
    s = result.stats
    return result.tokens, result.finish_reason, s.drafted, s.accepted, s.rounds


def random_policy(rng: random.Random, L: int) -> dict:
    return dict(strategy="self_speculative", exit_layer=rng.randint(1, L - 1), num_speculations=rng.randint(1, 6),
                draft_threshold=rng.choice([0.0, 0.05, 0.2, 0.4, 0.7]), adaptive=rng.random() < 0.75,
                probe_interval=rng.randint(1, 6), temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
                top_k=rng.choice([0, 10]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 32),
                max_new_tokens=rng.randint(8, 40), draft_vocab_size=rng.choice([None, None, 12]))


def plain_steps(result) -> int:
    """Tokens decoded plainly by a self-speculative row (the prefill's token and the rounds' excluded)."""
    s = result.stats
    return s.new_tokens - 1 - s.accepted - s.rounds


@needs_engine
def test_engine_matches_reference_for_random_policies(random_model, tiny_model):
    rng = random.Random(random_model.num_layers)
    seen = collections.Counter()
    for model, prompt in [(random_model, PROMPT)] * 6 + [(tiny_model, TINY_PROMPT)] * 6:
        kwargs = random_policy(rng, model.num_layers)
        ref, eng = both(model, prompt, **kwargs)
        assert counts(eng) == counts(ref), kwargs
        seen["plain"] += plain_steps(ref) > 0
        seen["cut"] += kwargs["draft_threshold"] > 0 and ref.stats.drafted < ref.stats.rounds * \
            kwargs["num_speculations"]
    assert seen["plain"] > 0 and seen["cut"] > 0, seen  # the cases exercise switching off and the threshold


@needs_engine
def test_engine_batch_rows_in_different_states_match_reference(tiny_model):
    """Rows of one batch: plain, speculating with and without the policy, sampled and greedy; each row equals
    its reference generation alone."""
    rng = random.Random(7)
    rows = [dict(random_policy(rng, 2), draft_vocab_size=None) for _ in range(5)]  # one draft vocabulary a batch
    rows[0]["draft_vocab_size"] = rows[1]["draft_vocab_size"] = 12
    rows.append(dict(strategy="autoregressive", exit_layer=None, num_speculations=None, temperature=0.8, top_k=0,
                     top_p=1.0, seed=5, max_new_tokens=20, draft_threshold=0.0, adaptive=False, probe_interval=32,
                     draft_vocab_size=None))
    prompts = [TINY_PROMPT[: 3 + i] for i in range(len(rows))]
    batched = {k: [r[k] for r in rows] for k in rows[0]}
    eng = layerskip_ext.generate(tiny_model, prompts, backend="engine", stop_token_ids=[], **batched)
    for i, kwargs in enumerate(rows):
        ref = layerskip_ext.generate(tiny_model, prompts[i], backend="reference", stop_token_ids=[], **kwargs)
        assert counts(eng[i]) == counts(ref), (i, kwargs)


@needs_engine
@pytest.mark.parametrize("E,d", [(1, 1), (1, 5), (2, 3)])
def test_greedy_every_option_equals_autoregressive(random_model, E, d):
    E = min(E, random_model.num_layers - 1)
    common = dict(max_new_tokens=40, stop_token_ids=[], backend="engine")
    ar = layerskip_ext.generate(random_model, PROMPT, **common)
    for threshold, probe, k in [(0.1, 3, None), (0.5, 1, None), (0.05, 2, 16)]:
        eng = layerskip_ext.generate(random_model, PROMPT, strategy="self_speculative", exit_layer=E,
                                     num_speculations=d, draft_threshold=threshold, adaptive=True,
                                     probe_interval=probe, draft_vocab_size=k, **common)
        assert eng.tokens == ar.tokens, (E, d, threshold, probe, k)


@needs_engine
def test_sampling_with_every_option_follows_full_model(tiny_model):
    """The 4th new token of many seeded generations, self-speculative with threshold, adaptive length,
    switching off and a reduced draft head (K = 12 of 32), is distributed as the same token of autoregressive
    sampling (two-sample chi-square), and
    differs from early-exit sampling at the draft's layer (so the test can fail)."""
    N, temp = 1500, 1.0
    common = dict(max_new_tokens=4, temperature=temp, stop_token_ids=[], backend="engine")
    spec = dict(strategy="self_speculative", exit_layer=1, num_speculations=3, draft_threshold=0.15, adaptive=True,
                probe_interval=1, draft_vocab_size=12)
    V = tiny_model.config.vocab_size

    def histogram(seed0, **kwargs):
        last = [layerskip_ext.generate(tiny_model, TINY_PROMPT[:3], seed=seed0 + i, **common, **kwargs).tokens[3]
                for i in range(N)]
        return torch.bincount(torch.tensor(last), minlength=V).double()

    full = histogram(0)
    adaptive = histogram(10 ** 6, **spec)
    draft = histogram(2 * 10 ** 6, strategy="early_exit", exit_layer=1)

    stat, dof = two_sample_chi_square(adaptive, full)
    assert stat < chi_square_limit(dof), (stat, dof)
    stat_draft, dof_draft = two_sample_chi_square(draft, full)
    assert stat_draft > chi_square_limit(dof_draft), "the test cannot tell the draft from the full model: change the model"


# ----------------------------------------------------------------------------------------------
# the reduced draft head


def test_reduced_head_reference_greedy_equals_autoregressive(tiny_model):
    common = dict(max_new_tokens=30, stop_token_ids=[], backend="reference")
    ar = layerskip_ext.generate(tiny_model, TINY_PROMPT, **common)
    for k in (1, 5, 32):
        r = layerskip_ext.generate(tiny_model, TINY_PROMPT, strategy="self_speculative", exit_layer=1,
                                   num_speculations=3, draft_vocab_size=k, **common)
        assert r.tokens == ar.tokens, k
    # K = 1: every draft is the most frequent token, so a round accepts exactly where the full model agrees
    top = collections.Counter(ar.tokens).most_common(1)[0][0]
    saved = tiny_model.draft_vocab
    tiny_model.draft_vocab = [top] + [t for t in saved if t != top]
    try:
        r = layerskip_ext.generate(tiny_model, TINY_PROMPT, strategy="self_speculative", exit_layer=1,
                                   num_speculations=1, draft_vocab_size=1, **common)
    finally:
        tiny_model.draft_vocab = saved
    i, expected = 1, 0  # replay the rounds: a round starting at token i accepts iff the full model says `top`
    while i < len(r.tokens):
        hit = r.tokens[i] == top
        expected += hit
        i += 2 if hit else 1
    assert r.tokens == ar.tokens and r.stats.accepted == expected and expected > 0


def test_reduced_head_errors(tiny_model, tmp_path):
    kwargs = dict(strategy="self_speculative", exit_layer=1, backend="reference")
    with pytest.raises(ValueError, match="draft_vocab_size must be in"):
        layerskip_ext.generate(tiny_model, TINY_PROMPT, draft_vocab_size=33, **kwargs)
    saved, tiny_model.draft_vocab = tiny_model.draft_vocab, None
    try:
        with pytest.raises(ValueError, match="layerskip-ext draft-vocab"):
            layerskip_ext.generate(tiny_model, TINY_PROMPT, draft_vocab_size=4, **kwargs)
    finally:
        tiny_model.draft_vocab = saved


def test_draft_vocab_file_round_trip_and_rejects_bad_files(tmp_path):
    from layerskip_ext import draft_vocab as dv
    assert dv.count_tokens([3, 1, 3, 2, 1, 3]) == [3, 1, 2]
    path = dv.save_draft_vocab(str(tmp_path), [3, 1, 2], vocab_size=8, tokens_counted=6)
    assert dv.load_draft_vocab(str(tmp_path), 8) == [3, 1, 2]
    assert dv.select([3, 1, 2], 2) == (1, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        dv.load_draft_vocab(str(tmp_path), 9)
    for text in ["{", '{"format": "layerskip_draft_vocab", "version": 1, "vocab_size": 8, "token_ids": [1, 1]}',
                 '{"format": "layerskip_draft_vocab", "version": 1, "vocab_size": 8, "token_ids": [9]}']:
        with open(path, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match="layerskip_draft_vocab.json"):
            dv.load_draft_vocab(str(tmp_path), 8)


@needs_engine
@pytest.mark.slow
def test_smollm2_every_option_equals_autoregressive(smollm2):
    from layerskip_ext.draft_vocab import count_tokens
    prompt = "The capital of France is"
    common = dict(max_new_tokens=32, stop_token_ids=[], backend="engine")
    ar = layerskip_ext.generate(smollm2, prompt, **common)
    saved = smollm2.draft_vocab
    smollm2.draft_vocab = count_tokens(smollm2.encode(" ".join([prompt] * 3 + ["Paris is the capital and largest "
                                                                               "city of France, on the Seine."])))
    try:
        for k in (None, len(smollm2.draft_vocab)):
            r = layerskip_ext.generate(smollm2, prompt, strategy="self_speculative", exit_layer=8, num_speculations=4,
                                       draft_threshold=0.2, adaptive=True, probe_interval=4, draft_vocab_size=k,
                                       **common)
            assert r.tokens == ar.tokens, k
            ref = layerskip_ext.generate(smollm2, prompt, strategy="self_speculative", exit_layer=8,
                                         num_speculations=4, draft_threshold=0.2, adaptive=True, probe_interval=4,
                                         draft_vocab_size=k, **dict(common, backend="reference"))
            assert (r.stats.drafted, r.stats.accepted, r.stats.rounds) == \
                (ref.stats.drafted, ref.stats.accepted, ref.stats.rounds)
    finally:
        smollm2.draft_vocab = saved
