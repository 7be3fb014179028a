"""Sampling statistics of the engine beyond tests/test_engine.py's (which checks temperature 1 without filters):
with temperature, top-k and top-p, the engine's draws over many seeds follow the reference's filtered
distribution (sampling.sampling_probs on the reference model's logits; chi-square at the 99.9% quantile),
tokens outside the filtered support never appear, self-speculative rejection sampling keeps the full model's
filtered distribution (not the draft's), and a seed gives the same tokens on repeated calls and in a batch
as alone. Seeds are fixed (range(N)), so each statistic is deterministic: a pass is not luck of the run.
"""
from __future__ import annotations

import collections

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext.sampling import sampling_probs
from chi_square import chi_square, chi_square_limit
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

PROMPT = [5, 17, 30, 7]
N = 2000  # seeds per distribution


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """3 layers, vocabulary 32, large weights: peaked but not degenerate distributions, a draft unlike the
    full model."""
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("m"), seed=3, std=0.25, num_hidden_layers=3,
                                   hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=32, tie_word_embeddings=False)
    return layerskip_ext.load(directory)


def counts(tokens, V):
    return torch.bincount(torch.tensor(tokens), minlength=V).double()


@torch.no_grad()
def filtered_probs(model, ids, temperature, top_k, top_p, exit_layer=None):
    """The reference's distribution of the next token after ids: [V] float64."""
    logits = model.module(torch.tensor([ids]), exit_layer=exit_layer)[0, -1:]  # [1, V]
    return sampling_probs(logits, temperature, top_k, top_p)[0].double()


def assert_follows(observed, probs, label):
    assert observed[probs == 0].sum() == 0, f"{label}: drew a token the filters remove"
    stat, dof = chi_square(observed, probs)
    assert dof >= 1, f"{label}: a single possible token tests nothing: change the filters"
    assert stat < chi_square_limit(dof), (label, stat, dof)
    return stat, dof


FILTERS = [(0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.8), (0.8, 10, 0.9), (1e4, 0, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", FILTERS)
def test_first_token_follows_the_filtered_distribution(model, temperature, top_k, top_p):
    V = model.config.vocab_size
    tokens = [layerskip_ext.generate(model, PROMPT, max_new_tokens=1, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, stop_token_ids=[], backend="engine").tokens[0]
              for seed in range(N)]
    assert_follows(counts(tokens, V), filtered_probs(model, PROMPT, temperature, top_k, top_p), "autoregressive")


@pytest.mark.parametrize("temperature,top_k,top_p", FILTERS[:4])
def test_early_exit_follows_the_exit_layers_filtered_distribution(model, temperature, top_k, top_p):
    V = model.config.vocab_size
    tokens = [layerskip_ext.generate(model, PROMPT, max_new_tokens=1, strategy="early_exit", exit_layer=1,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                     stop_token_ids=[], backend="engine").tokens[0]
              for seed in range(N)]
    assert_follows(counts(tokens, V), filtered_probs(model, PROMPT, temperature, top_k, top_p, exit_layer=1),
                   "early exit")


@pytest.mark.parametrize("temperature,top_k,top_p", FILTERS[:4])
@pytest.mark.parametrize("E,d", [(1, 3), (2, 2)])
def test_self_speculative_follows_the_full_models_filtered_distribution(model, temperature, top_k, top_p, E, d):
    """Tokens 2 and 3 come out of the draft / verify rounds (rejection sampling against the filtered draft and
    target): given the most frequent earlier tokens, each follows the full model's filtered distribution."""
    V = model.config.vocab_size
    kwargs = dict(max_new_tokens=3, strategy="self_speculative", exit_layer=E, num_speculations=d,
                  temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=[], backend="engine")
    runs = [layerskip_ext.generate(model, PROMPT, seed=seed, **kwargs).tokens for seed in range(N)]
    t1 = collections.Counter(r[0] for r in runs).most_common(1)[0][0]
    second = [r[1] for r in runs if r[0] == t1]
    full = filtered_probs(model, PROMPT + [t1], temperature, top_k, top_p)
    assert_follows(counts(second, V), full, "token 2")
    draft = filtered_probs(model, PROMPT + [t1], temperature, top_k, top_p, exit_layer=E)
    stat_draft, dof = chi_square(counts(second, V), draft) if (draft > 0).sum() > 1 else (float("inf"), 1)
    if not torch.allclose(full, draft, atol=0.02):  # only when the two differ can the test tell them apart
        assert stat_draft > chi_square_limit(dof), "token 2 follows the draft, not the full model"
    t2 = collections.Counter(second).most_common(1)[0][0]
    third = [r[2] for r in runs if r[:2] == [t1, t2]]
    if len(third) >= 200:
        assert_follows(counts(third, V), filtered_probs(model, PROMPT + [t1, t2], temperature, top_k, top_p),
                       "token 3")


@pytest.mark.parametrize("strategy,E,d", [("autoregressive", None, None), ("early_exit", 2, None),
                                          ("self_speculative", 1, 3), ("self_speculative", 2, 4)])
def test_a_seed_gives_the_same_tokens_repeated_and_in_any_batch(model, strategy, E, d):
    kwargs = dict(max_new_tokens=20, strategy=strategy, exit_layer=E, num_speculations=d, stop_token_ids=[],
                  backend="engine")
    rows = [dict(temperature=0.9, top_k=0, top_p=1.0, seed=7), dict(temperature=1.3, top_k=6, top_p=1.0, seed=7),
            dict(temperature=0.6, top_k=0, top_p=0.85, seed=2**64 - 3), dict(temperature=0.9, top_k=0, top_p=1.0,
                                                                              seed=8)]
    prompts = [PROMPT, PROMPT[:2], [1, 2, 3, 4, 5, 6], PROMPT]
    alone = [layerskip_ext.generate(model, p, **kwargs, **r).tokens for p, r in zip(prompts, rows)]
    assert alone == [layerskip_ext.generate(model, p, **kwargs, **r).tokens for p, r in zip(prompts, rows)]
    assert alone[0] != alone[3], "seeds 7 and 8 drew the same 20 tokens: the seed is not used"
    batched = layerskip_ext.generate(model, prompts, **kwargs, **{k: [r[k] for r in rows] for k in rows[0]})
    assert [b.tokens for b in batched] == alone
    # the same prompt and seed twice in one batch, beside other rows, in another order
    order = [3, 0, 0, 2, 1]
    batched = layerskip_ext.generate(model, [prompts[i] for i in order], **kwargs,
                                     **{k: [rows[i][k] for i in order] for k in rows[0]})
    assert [b.tokens for b in batched] == [alone[i] for i in order]
    reference = [layerskip_ext.generate(model, p, **dict(kwargs, backend="reference"), **r).tokens
                 for p, r in zip(prompts, rows)]
    assert reference == alone
