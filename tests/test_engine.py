"""The C++ engine against the reference (reference_generate.py): tokens, stop rules, RNG, memory, streaming.

Random Llama checkpoints are written by transformers (save_pretrained) and loaded with layerskip_ext.load;
SmolLM2-135M is the default model. Greedy output must equal the reference token for token for every
strategy; seeded sampling must equal the reference for the same seed.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext import ops
from layerskip_ext.generation import check_generation_args
from layerskip_ext.reference_generate import generate_reference
from chi_square import chi_square, chi_square_limit
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

PROMPT = [5, 17, 42, 7, 99, 3, 61]
TINY_PROMPT = [5, 17, 30, 7, 9, 3, 21]  # vocabulary 32


@pytest.fixture(scope="module")
def random_model(random_checkpoint):
    """conftest's random checkpoints: GQA / MQA / MHA, tied and untied, head_dim != hidden / heads, llama3 rope."""
    return layerskip_ext.load(random_checkpoint[1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """2 layers, vocabulary 32: for the many-seed tests."""
    directory = tmp_path_factory.mktemp("tiny")
    return layerskip_ext.load(make_hf_checkpoint(directory, seed=3, std=0.25, num_hidden_layers=2, hidden_size=32,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                 vocab_size=32, tie_word_embeddings=True))



def both(model, prompt=PROMPT, **kwargs):
    """(reference result, engine result) of one generation with the same arguments."""
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("stop_token_ids", [])
    ref = layerskip_ext.generate(model, prompt, backend="reference", **kwargs)
    eng = layerskip_ext.generate(model, prompt, backend="engine", **kwargs)
    return ref, eng


def assert_same(ref, eng):
    assert eng.tokens == ref.tokens
    assert eng.finish_reason == ref.finish_reason
    assert eng.stats.new_tokens == ref.stats.new_tokens == len(ref.tokens)
    assert (eng.stats.drafted, eng.stats.accepted, eng.stats.rounds) == \
        (ref.stats.drafted, ref.stats.accepted, ref.stats.rounds)


def speculative_grid(L):
    """(E, d) pairs covering E = 1, E = L - 1, a middle exit and d = 1..6."""
    mid = max(1, L // 2)
    return [(1, 1), (1, 4), (L - 1, 2), (L - 1, 6), (mid, 3), (mid, 5)]


# ----------------------------------------------------------------------------------------------
# greedy: identical tokens


def test_greedy_autoregressive_and_early_exit(random_model):
    L = random_model.num_layers
    assert_same(*both(random_model))
    for E in sorted({1, L - 1, L}):
        assert_same(*both(random_model, strategy="early_exit", exit_layer=E))


def test_greedy_self_speculative(random_model):
    L = random_model.num_layers
    ar = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=24, stop_token_ids=[], backend="engine")
    for E, d in speculative_grid(L):
        ref, eng = both(random_model, strategy="self_speculative", exit_layer=E, num_speculations=d)
        assert_same(ref, eng)
        assert eng.tokens == ar.tokens  # lossless: the full model's greedy output


def test_greedy_bf16_weights_match_reference_on_rounded_weights(random_model):
    """bf16 matmul weights with fp32 activations == the fp32 reference, on weights that bf16 holds exactly (the
    float32-activation linear kernel forced: avx512bf16 rounds the activations, tests/test_linear_bf16dot.py)."""
    ops.set_linear_kernel(next(k for k in ops.linear_kernels() if k != "avx512bf16"))
    try:
        _bf16_weights_match_reference(random_model)
    finally:
        ops.set_linear_kernel("auto")


def _bf16_weights_match_reference(random_model):
    rounded = layerskip_ext.load(random_model.path)
    with torch.no_grad():
        for p in rounded.module.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    for kwargs in (dict(), dict(strategy="self_speculative", exit_layer=1, num_speculations=3)):
        ref = layerskip_ext.generate(rounded, PROMPT, max_new_tokens=16, stop_token_ids=[], backend="reference",
                                     **kwargs)
        eng = layerskip_ext.generate(rounded, PROMPT, max_new_tokens=16, stop_token_ids=[], backend="engine",
                                     weight_dtype=torch.bfloat16, **kwargs)
        assert eng.tokens == ref.tokens
    assert rounded._engine[torch.bfloat16].weight_bytes_per_token < \
        engine_mod.get_engine(rounded, torch.float32).weight_bytes_per_token


@pytest.mark.slow
def test_smollm2_greedy_every_strategy(smollm2):
    prompt = "The capital of France is"
    common = dict(max_new_tokens=32, stop_token_ids=[])
    ref_ar, eng_ar = both(smollm2, prompt, **common)
    assert_same(ref_ar, eng_ar)
    assert_same(*both(smollm2, prompt, strategy="early_exit", exit_layer=12, **common))
    for E, d in [(1, 1), (8, 4), (15, 6), (29, 2)]:
        ref, eng = both(smollm2, prompt, strategy="self_speculative", exit_layer=E, num_speculations=d, **common)
        assert eng.tokens == ref_ar.tokens, (E, d)
        assert_same(ref, eng)  # the exact drafted / accepted / rounds counts of the reference


# ----------------------------------------------------------------------------------------------
# sampling: same seed, same tokens as the reference


@pytest.mark.parametrize("strategy,E,d", [("autoregressive", None, None), ("early_exit", 2, None),
                                          ("self_speculative", 1, 3), ("self_speculative", 2, 5)])
@pytest.mark.parametrize("filters", [dict(), dict(top_k=20, top_p=0.9)])
def test_seeded_sampling_matches_reference(random_model, strategy, E, d, filters):
    E = None if E is None else min(E, random_model.num_layers - 1)
    kwargs = dict(strategy=strategy, exit_layer=E, num_speculations=d, temperature=0.9, seed=1234, **filters)
    assert_same(*both(random_model, **kwargs))
    other = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=24, stop_token_ids=[], backend="engine",
                                   **dict(kwargs, seed=99))
    same = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=24, stop_token_ids=[], backend="engine",
                                  **kwargs)
    assert other.tokens != same.tokens


def test_self_speculative_sampling_follows_full_model(tiny_model):
    """Token 2 of many seeded generations, given the most frequent token 1, is distributed as the full
    model says (chi-square), and not as the draft (layer 1) says."""
    N, E, d, temp = 2000, 1, 3, 1.0
    firsts, seconds = [], collections.defaultdict(list)
    for seed in range(N):
        r = layerskip_ext.generate(tiny_model, TINY_PROMPT[:3], max_new_tokens=2, strategy="self_speculative",
                                   exit_layer=E, num_speculations=d, temperature=temp, seed=seed,
                                   stop_token_ids=[], backend="engine")
        firsts.append(r.tokens[0])
        seconds[r.tokens[0]].append(r.tokens[1])
    t1 = collections.Counter(firsts).most_common(1)[0][0]
    observed = torch.bincount(torch.tensor(seconds[t1]), minlength=tiny_model.config.vocab_size).double()
    ids = torch.tensor([TINY_PROMPT[:3] + [t1]])
    with torch.no_grad():
        full = torch.softmax(tiny_model.module(ids)[0, -1].double() / temp, -1)
        draft = torch.softmax(tiny_model.module(ids, exit_layer=E)[0, -1].double() / temp, -1)

    stat_full, dof = chi_square(observed, full)
    stat_draft, _ = chi_square(observed, draft)
    limit = chi_square_limit(dof)
    assert stat_full < limit, (stat_full, dof)
    assert stat_draft > limit, "the test cannot tell the draft from the full model: change the model"


# ----------------------------------------------------------------------------------------------
# stop rules, context limit, streaming


@pytest.mark.parametrize("strategy,E,d", [("autoregressive", None, None), ("early_exit", 2, None),
                                          ("self_speculative", 1, 4), ("self_speculative", 2, 2)])
def test_stop_rules_match_reference(random_model, strategy, E, d):
    E = None if E is None else min(E, random_model.num_layers - 1)
    kw = dict(strategy=strategy, exit_layer=E, num_speculations=d)
    free = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=24, stop_token_ids=[], backend="engine", **kw)
    stop = free.tokens[5]
    ref, eng = both(random_model, stop_token_ids=[stop, 0], **kw)
    assert_same(ref, eng)
    assert eng.finish_reason == "stop" and eng.tokens[-1] == stop and stop not in eng.tokens[:-1]
    ref, eng = both(random_model, max_new_tokens=0, **kw)
    assert_same(ref, eng)
    assert eng.tokens == [] and eng.finish_reason == "length"
    for n in (1, 2, 7):
        assert_same(*both(random_model, max_new_tokens=n, **kw))
    for ctx in (len(PROMPT) + 1, len(PROMPT) + 2, len(PROMPT) + 9):
        ref, eng = both(random_model, max_new_tokens=50, context_length=ctx, **kw)
        assert_same(ref, eng)
        assert eng.finish_reason == "context" and len(eng.tokens) == ctx - len(PROMPT)


@pytest.mark.parametrize("kw", [dict(), dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
                                dict(strategy="early_exit", exit_layer=1, temperature=0.7, seed=5)])
def test_streaming_callback_gets_result_tokens(random_model, kw):
    streamed = []
    result = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=20, stop_token_ids=[], backend="engine",
                                    on_token=streamed.append, **kw)
    plain = layerskip_ext.generate(random_model, PROMPT, max_new_tokens=20, stop_token_ids=[], backend="engine", **kw)
    assert streamed == result.tokens == plain.tokens
    assert len(streamed) == 20


def test_run_steps_like_step_until_done(random_model):
    """Engine.run (generate without a callback) steps in C++ until every row is done or its time is up: at least
    one step per call, the same tokens as calling step() each time; a bad time limit is refused."""
    eng = engine_mod.Engine(random_model, torch.float32, max_rows=2)
    args = [check_generation_args(random_model.config, random_model.tokenizer, p, max_new_tokens=12,
                                  strategy="self_speculative", exit_layer=1, num_speculations=2, temperature=t,
                                  top_k=0, top_p=1.0, seed=3, stop_token_ids=[],
                                  context_length=random_model.config.max_position_embeddings)
            for p, t in ((PROMPT, 0.0), (PROMPT[:3], 0.8))]
    raw = eng._engine
    stepped = [eng.add_row(a) for a in args]
    steps = 0
    while raw.has_unfinished():
        raw.step()
        steps += 1
    expected = [raw.tokens(r).tolist() for r in stepped]
    for r in stepped:
        eng.remove_row(r)
    rows = [eng.add_row(a) for a in args]
    assert raw.run(0.0) == 1  # one step (the prefills) however short the limit
    assert raw.run(1e9) == steps - 1 and not raw.has_unfinished()
    assert [raw.tokens(r).tolist() for r in rows] == expected
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="max_seconds"):
            raw.run(bad)


# ----------------------------------------------------------------------------------------------
# one engine, many calls


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_calls_identical_and_memory_flat(tiny_model):
    kw = dict(max_new_tokens=24, stop_token_ids=[], backend="engine")
    cases = [dict(), dict(strategy="self_speculative", exit_layer=1, num_speculations=4),
             dict(strategy="self_speculative", exit_layer=1, num_speculations=2, temperature=0.8, seed=7),
             dict(strategy="early_exit", exit_layer=1, temperature=1.0, top_k=5, seed=3)]
    first = [layerskip_ext.generate(tiny_model, TINY_PROMPT, **kw, **c).tokens for c in cases]
    engine = tiny_model._engine[torch.float32]
    rss0 = _rss_bytes()
    for i in range(50):
        c = cases[i % len(cases)]
        assert layerskip_ext.generate(tiny_model, TINY_PROMPT, **kw, **c).tokens == first[i % len(cases)]
    growth = _rss_bytes() - rss0
    assert tiny_model._engine[torch.float32] is engine  # built once, reused
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 50 calls"


def test_capacity_grows_on_demand(tiny_model):
    engine = engine_mod.Engine(tiny_model, capacity=8)
    args = check_generation_args(tiny_model.config, None, TINY_PROMPT, max_new_tokens=40, strategy="self_speculative",
                                 exit_layer=1, num_speculations=3, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                 stop_token_ids=[], context_length=256)
    ref = generate_reference(tiny_model.module, args)
    assert engine.generate(args).tokens == ref.tokens
    assert engine.capacity >= len(TINY_PROMPT) + 40


def test_auto_backend_uses_engine_and_bad_weight_dtype(tiny_model):
    tiny_model._engine = None
    layerskip_ext.generate(tiny_model, TINY_PROMPT, max_new_tokens=2)
    assert torch.float32 in tiny_model._engine
    with pytest.raises(ValueError, match="weight_dtype"):
        layerskip_ext.generate(tiny_model, TINY_PROMPT, max_new_tokens=2, weight_dtype=torch.float16)
