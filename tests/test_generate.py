"""generate(): the three strategies on both backends (reference, engine): equivalences, sampling, stopping, bad arguments."""
import math

import pytest
import torch

import layerskip_ext
from conftest import make_hf_checkpoint

BACKENDS = ["reference", "engine"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-layer random model with a 32-token vocabulary (no tokenizer)."""
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), num_hidden_layers=6, hidden_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   vocab_size=32, tie_word_embeddings=False, max_position_embeddings=96)
    return layerskip_ext.load(directory)


def gen(backend, model, prompt, **kwargs):
    return layerskip_ext.generate(model, prompt, backend=backend, **kwargs)


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def test_self_speculative_greedy_equals_autoregressive_for_every_exit(tiny, backend):
    reference = gen(backend, tiny, PROMPT, max_new_tokens=40, stop_token_ids=[])
    assert len(reference.tokens) == 40
    for exit_layer in range(1, tiny.num_layers):
        for d in (1, 2, 3, 5, 8):
            result = gen(backend, tiny, PROMPT, max_new_tokens=40, stop_token_ids=[], strategy="self_speculative",
                         exit_layer=exit_layer, num_speculations=d)
            assert result.tokens == reference.tokens, (exit_layer, d)
            stats = result.stats
            assert stats.drafted >= stats.accepted and stats.rounds > 0
            assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.drafted)


def greedy_by_full_forward(model, prompt, n, exit_layer):
    """Greedy decoding without any cache: a whole forward pass per token (the slow, obvious oracle)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.module(torch.tensor([ids]), exit_layer=exit_layer)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("exit_layer", [1, 3, 6])
def test_early_exit_greedy_is_argmax_of_exit_logits(tiny, exit_layer, backend):
    strategy = "autoregressive" if exit_layer == tiny.num_layers else "early_exit"
    result = gen(backend, tiny, PROMPT, max_new_tokens=12, stop_token_ids=[], strategy=strategy, exit_layer=exit_layer)
    assert result.tokens == greedy_by_full_forward(tiny, PROMPT, 12, exit_layer)


@pytest.mark.slow
@pytest.mark.parametrize("exit_layer,d", [(1, 3), (8, 4), (15, 2), (22, 6), (29, 5)])
def test_self_speculative_greedy_equals_autoregressive_smollm2(smollm2, exit_layer, d, backend):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    expected = gen(backend, smollm2, prompt, max_new_tokens=24, stop_token_ids=[])
    result = gen(backend, smollm2, prompt, max_new_tokens=24, stop_token_ids=[], strategy="self_speculative",
                 exit_layer=exit_layer, num_speculations=d)
    assert result.tokens == expected.tokens
    assert result.text == expected.text and "Paris" in result.text


# ----------------------------------------------------------------------------------------------
# sampling


def chi_square_p_value(counts, probs):
    """Upper tail of Pearson's chi-square statistic (bins with expected < 5 pooled)."""
    from scipy.stats import chisquare
    counts, probs = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(probs, dtype=torch.float64)
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue


def full_model_first_two_token_marginals(model, prompt, temperature, top_k, top_p):
    """Exact distributions of the first and second new token under the full model."""
    from layerskip_ext.sampling import sampling_probs
    with torch.no_grad():
        p1 = sampling_probs(model.module(torch.tensor([prompt]))[0, -1:], temperature, top_k, top_p)[0]  # [V]
        V = p1.shape[0]
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2_given = sampling_probs(model.module(seqs)[:, -1], temperature, top_k, top_p)  # [V, V]
    return p1.double(), (p1.double()[:, None] * p2_given.double()).sum(0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_self_speculative_sampling_follows_the_full_model(tiny, temperature, top_k, top_p, backend):
    prompt = [7, 7, 1, 30]
    p1, p2 = full_model_first_two_token_marginals(tiny, prompt, temperature, top_k, top_p)
    n = 1500
    counts = torch.zeros(2, tiny.config.vocab_size)
    for seed in range(n):
        r = gen(backend, tiny, prompt, max_new_tokens=2, stop_token_ids=[], strategy="self_speculative", exit_layer=1,
                num_speculations=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        counts[0, r.tokens[0]] += 1
        counts[1, r.tokens[1]] += 1
    assert chi_square_p_value(counts[0], p1) > 1e-3
    assert chi_square_p_value(counts[1], p2) > 1e-3
    # the test has power: the draft exit's own distribution is rejected
    from layerskip_ext.sampling import sampling_probs
    with torch.no_grad():
        draft = sampling_probs(tiny.module(torch.tensor([prompt]), exit_layer=1)[0, -1:], temperature, top_k, top_p)[0]
    assert chi_square_p_value(counts[0], draft) < 1e-6


def test_seed_reproducible_and_seeds_differ(tiny, backend):
    kwargs = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.0, strategy="self_speculative", exit_layer=2,
                  num_speculations=3)
    a, b = gen(backend, tiny, PROMPT, seed=123, **kwargs), gen(backend, tiny, PROMPT, seed=123, **kwargs)
    assert a.tokens == b.tokens
    others = {tuple(gen(backend, tiny, PROMPT, seed=s, **kwargs).tokens) for s in range(5)}
    assert len(others) > 1


def test_sampled_autoregressive_follows_the_full_model(tiny, backend):
    prompt = [2, 9]
    p1, _ = full_model_first_two_token_marginals(tiny, prompt, 1.3, 0, 1.0)
    counts = torch.zeros(tiny.config.vocab_size)
    for seed in range(1500):
        counts[gen(backend, tiny, prompt, max_new_tokens=1, temperature=1.3, seed=seed).tokens[0]] += 1
    assert chi_square_p_value(counts, p1) > 1e-3


# ----------------------------------------------------------------------------------------------
# stopping and streaming


def test_stop_tokens(tiny, backend):
    free = gen(backend, tiny, PROMPT, max_new_tokens=30, stop_token_ids=[])
    stop = free.tokens[10]
    first = free.tokens.index(stop)
    for strategy, extra in (("autoregressive", {}), ("self_speculative", dict(exit_layer=3, num_speculations=4))):
        r = gen(backend, tiny, PROMPT, max_new_tokens=30, stop_token_ids=[stop], strategy=strategy, **extra)
        assert r.tokens == free.tokens[: first + 1] and r.finish_reason == "stop"
    assert free.finish_reason == "length"


def test_default_stop_is_the_models_eos(tiny, backend):
    free = gen(backend, tiny, PROMPT, max_new_tokens=30, stop_token_ids=[])
    eos = free.tokens[5]
    model = layerskip_ext.LayerSkipModel(tiny.config.replace(eos_token_ids=(eos,)), tiny.module, None)
    r = gen(backend, model, PROMPT, max_new_tokens=30)
    assert r.tokens[-1] == eos and r.finish_reason == "stop" and len(r.tokens) == free.tokens.index(eos) + 1


def test_max_new_tokens_zero_and_exact_count(tiny, backend):
    assert gen(backend, tiny, PROMPT, max_new_tokens=0).tokens == []
    for d in (1, 4, 7):
        r = gen(backend, tiny, PROMPT, max_new_tokens=13, stop_token_ids=[], strategy="self_speculative", exit_layer=2,
                num_speculations=d)
        assert len(r.tokens) == 13 and r.finish_reason == "length"


def test_context_limit(tiny, backend):
    for strategy, extra in (("autoregressive", {}), ("early_exit", dict(exit_layer=2)),
                            ("self_speculative", dict(exit_layer=2, num_speculations=6))):
        r = gen(backend, tiny, PROMPT, max_new_tokens=500, stop_token_ids=[], strategy=strategy, context_length=20, **extra)
        assert len(PROMPT) + len(r.tokens) == 20 and r.finish_reason == "context", strategy
    full = gen(backend, tiny, PROMPT, max_new_tokens=200, stop_token_ids=[], strategy="self_speculative", exit_layer=3)
    assert len(PROMPT) + len(full.tokens) == tiny.config.max_position_embeddings
    assert full.tokens == gen(backend, tiny, PROMPT, max_new_tokens=200, stop_token_ids=[]).tokens


def test_streaming_callback_gets_every_token_in_order(tiny, backend):
    seen = []
    r = gen(backend, tiny, PROMPT, max_new_tokens=20, stop_token_ids=[], strategy="self_speculative", exit_layer=2,
            num_speculations=3, on_token=seen.append)
    assert seen == r.tokens


def test_stats(tiny, backend):
    r = gen(backend, tiny, PROMPT, max_new_tokens=10, stop_token_ids=[])
    s = r.stats
    assert s.new_tokens == 10 and s.prompt_tokens == len(PROMPT) and s.acceptance_rate is None
    assert s.tokens_per_second > 0 and math.isclose(s.time_per_token, s.decode_time_s / 9)


# ----------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="beam"), "strategy must be one of"),
    (dict(strategy="self_speculative", exit_layer=0), r"exit_layer must be in \[1, 5\]"),
    (dict(strategy="self_speculative", exit_layer=6), r"exit_layer must be in \[1, 5\]"),
    (dict(strategy="early_exit", exit_layer=7), r"exit_layer must be in \[1, 6\]"),
    (dict(strategy="early_exit"), "needs exit_layer"),
    (dict(strategy="self_speculative", exit_layer=2, num_speculations=0), "num_speculations must be an integer in \\[1, 1024\\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed="x"), "seed"),
    (dict(stop_token_ids=[1000]), "stop token id"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(context_length=5), "does not leave room"),
    (dict(context_length=1000), "exceeds the model's max_position_embeddings"),
])
def test_bad_arguments(tiny, kwargs, match, backend):
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=match):
        layerskip_ext.generate(tiny, PROMPT, **kwargs)


@pytest.mark.parametrize("prompt,match", [
    ([], "prompt is empty"),
    ("", "prompt is empty"),
    ([1, 2, 99], "out of range"),
    ([1, -1], "out of range"),
    ([1, "a"], "must be integers"),
    (3.5, "prompt must be a string or a list"),
    (list(range(32)) * 3, "does not leave room"),
])
def test_bad_prompts(tiny, prompt, match, backend):
    with pytest.raises(ValueError, match=match):
        gen(backend, tiny, prompt, max_new_tokens=4)


def test_string_prompt_without_tokenizer(tiny, backend):
    with pytest.raises(ValueError, match="no tokenizer"):
        gen(backend, tiny, "hello", max_new_tokens=4)


def test_not_a_model():
    with pytest.raises(TypeError, match="LayerSkipModel"):
        layerskip_ext.generate("model", [1, 2])
