"""Hostile arguments at the Python entry points and degenerate numbers in the ops: huge max_new_tokens,
extreme temperatures, bools for integers, numpy integers, NaN logits from a broken model, counters at the
int64 limit, exceptions raised by on_token. Each gives the documented error (or the correct result) and
leaves the model usable."""
import numpy as np
import pytest
import torch

import layerskip_ext
from layerskip_ext import LayerSkipError, ops
from conftest import make_hf_checkpoint

BACKENDS = ["reference", "engine"]
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer random model with a 32-token vocabulary and 64 positions (no tokenizer)."""
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), num_hidden_layers=4, hidden_size=32,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=32, tie_word_embeddings=False, max_position_embeddings=64)
    return layerskip_ext.load(directory)


def gen(backend, model, prompt=PROMPT, **kwargs):
    kwargs.setdefault("stop_token_ids", [])
    return layerskip_ext.generate(model, prompt, backend=backend, **kwargs)


@pytest.mark.parametrize("huge", [2**62, 2**63 - 1, 2**63, 2**64 + 5, 10**30])
def test_huge_max_new_tokens_runs_to_the_context(tiny, backend, huge):
    """Any max_new_tokens past the context behaves as 'until the context is full' (no int64 overflow)."""
    expected = gen(backend, tiny, max_new_tokens=64)
    result = gen(backend, tiny, max_new_tokens=huge)
    assert result.tokens == expected.tokens and len(result.tokens) == 64 - len(PROMPT)
    assert result.finish_reason == expected.finish_reason == "context"
    spec = gen(backend, tiny, max_new_tokens=huge, strategy="self_speculative", exit_layer=2, num_speculations=3)
    assert spec.tokens == expected.tokens


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=1e-300), "temperature"),
    (dict(temperature=5e-5), "temperature"),
    (dict(temperature=1e300), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="1.0"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_p=True), "top_p"),
    (dict(top_p="0.5"), "top_p"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=np.float64(3)), "max_new_tokens"),
    (dict(seed=True), "seed"),
    (dict(stop_token_ids=[True]), "stop token ids"),
    (dict(stop_token_ids="ab"), "stop token ids"),
    (dict(strategy="early_exit", exit_layer=True), "exit_layer"),
])
def test_bad_arguments_raise_the_documented_error_and_leave_the_model_usable(tiny, backend, kwargs, match):
    kwargs = dict(kwargs)  # the parametrized dict is shared by both backends
    before = gen(backend, tiny, max_new_tokens=6)
    with pytest.raises(LayerSkipError, match=match):
        gen(backend, tiny, max_new_tokens=kwargs.pop("max_new_tokens", 6), **kwargs)
    assert gen(backend, tiny, max_new_tokens=6).tokens == before.tokens


@pytest.mark.parametrize("temperature", [0.0, 1e-4, 1e4])
def test_temperature_range_edges_are_accepted(tiny, backend, temperature):
    result = gen(backend, tiny, max_new_tokens=5, temperature=temperature, seed=1)
    assert len(result.tokens) == 5
    if temperature == 1e-4:  # as cold as greedy on a random model's logits
        assert result.tokens == gen(backend, tiny, max_new_tokens=5).tokens


def test_numpy_and_tensor_integers_are_accepted_everywhere(tiny, backend):
    expected = gen(backend, tiny, max_new_tokens=6, strategy="self_speculative", exit_layer=2, num_speculations=2,
                   temperature=0.8, top_k=5, seed=7, stop_token_ids=[31])
    for conv in (np.int64, np.int32, np.uint16, lambda x: torch.tensor(x)):
        result = gen(backend, tiny, [conv(t) for t in PROMPT], max_new_tokens=conv(6), strategy="self_speculative",
                     exit_layer=conv(2), num_speculations=conv(2), temperature=np.float32(0.8), top_k=conv(5),
                     seed=conv(7), stop_token_ids=[conv(31)])
        assert result.tokens == expected.tokens
        assert all(type(t) is int for t in result.tokens)
    assert gen(backend, tiny, np.array(PROMPT), max_new_tokens=6, strategy="self_speculative", exit_layer=2,
               num_speculations=2, temperature=0.8, top_k=5, seed=7, stop_token_ids=np.array([31])).tokens \
        == expected.tokens


def test_raising_in_on_token_cancels_and_leaves_the_model_usable(tiny, backend):
    expected = gen(backend, tiny, max_new_tokens=12, strategy="self_speculative", exit_layer=2, num_speculations=3)

    class Cancel(Exception):
        pass

    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 3:
            raise Cancel

    with pytest.raises(Cancel):
        gen(backend, tiny, max_new_tokens=12, strategy="self_speculative", exit_layer=2, num_speculations=3,
            on_token=on_token)
    assert seen == expected.tokens[:3]
    for strategy, E in (("self_speculative", 2), ("autoregressive", None)):  # both strategies start afresh
        again = gen(backend, tiny, max_new_tokens=12, strategy=strategy, exit_layer=E, num_speculations=3)
        assert again.tokens == expected.tokens


def test_nan_weights_give_a_clear_error_not_garbage_tokens(tmp_path):
    """A broken model (NaN in the final norm: every logit NaN) is an error on the engine, every strategy."""
    directory = make_hf_checkpoint(tmp_path / "m", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=32,
                                   max_position_embeddings=64)
    model = layerskip_ext.load(directory)
    with torch.no_grad():
        model.module.model.norm.weight[3] = float("nan")
    for kwargs in (dict(), dict(temperature=0.7, seed=1), dict(strategy="self_speculative", exit_layer=1),
                   dict(strategy="self_speculative", exit_layer=1, temperature=0.7, seed=1)):
        with pytest.raises(RuntimeError, match="finite"):
            layerskip_ext.generate(model, PROMPT, max_new_tokens=4, backend="engine", **kwargs)


# ---------------------------------------------------------------------------------------------------
# the ops


def test_sampling_probs_refuses_nan_logits_instead_of_returning_nan():
    logits = torch.randn(3, 40)
    logits[1, 7] = float("nan")
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.9)):
        with pytest.raises(RuntimeError, match="logits row 1 must have a finite maximum and no NaN"):
            ops.sampling_probs(logits, 0.8, top_k, top_p)
    with pytest.raises(RuntimeError, match="logits row 1"):
        ops.sample(logits, 0.0, 0, 1.0, 0, 0)  # greedy
    logits[1, 7] = float("inf")
    with pytest.raises(RuntimeError, match="logits row 1"):
        ops.sample(logits, 0.0, 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="logits row 0"):
        ops.speculative_accept_greedy(torch.tensor([1, 2]), torch.full((3, 40), float("nan")))


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 5e-5, 2e4, 1e300])
def test_sampling_ops_refuse_temperatures_that_overflow_float32(temperature):
    with pytest.raises(RuntimeError, match=r"temperature must be 0 \(greedy\) or in \[1e-4, 1e4\]"):
        ops.sampling_probs(torch.randn(2, 10), temperature, 0, 1.0)
    with pytest.raises(RuntimeError, match="temperature must be 0"):
        ops.sample(torch.randn(2, 10), temperature, 0, 1.0, 0, 0)


def test_sampling_probs_finite_at_the_temperature_limits():
    logits = torch.randn(4, 1000) * 30
    for t in (1e-4, 1e4):
        probs = ops.sampling_probs(logits, t, 0, 1.0)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(4))
        torch.testing.assert_close(probs, torch.softmax(logits / t, -1), atol=1e-5, rtol=1e-3)


def test_sample_from_probs_counter_at_the_int64_limit():
    """Counters just below 2^63 - 1 draw as the Python reference does (no signed overflow); a counter of
    2^63 - 1 or more is refused with a clear error (the valid range is [0, 2^63 - 1))."""
    probs = torch.rand(4, 50)
    offset = 2**63 - 5  # counters offset .. offset + 3 = 2^63 - 2
    out = ops.sample_from_probs(probs, 5, offset)
    from layerskip_ext.sampling import sample_from_probs
    expected = sample_from_probs(probs / probs.sum(-1, keepdim=True), 5, offset)
    assert out.tolist() == expected.tolist()
    with pytest.raises(RuntimeError, match="counters"):
        ops.sample_from_probs(probs, 5, 2**63 - 2)  # the second row's counter is 2^63 - 1


@pytest.mark.parametrize("index", [2**63 - 1, -2**63])
def test_cache_indices_at_the_int64_limits_are_refused(index):
    """Positions and rows at the int64 limits: a bound check written as `position + 1 <= S` wraps around and
    lets them through to an out-of-bounds write; the checks compare without arithmetic."""
    big = torch.tensor([0, index])
    kc, vc, kv = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4), torch.randn(2, 2, 4)
    q, rows, positions = torch.randn(2, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"kv_cache_write: positions\[1\] = .* is outside \[0, 8\)"):
        ops.kv_cache_write(kc, vc, kv, kv, rows, big)
    with pytest.raises(RuntimeError, match=r"kv_cache_write: rows\[1\] = .* is outside \[0, 2\)"):
        ops.kv_cache_write(kc, vc, kv, kv, big, positions)
    with pytest.raises(RuntimeError, match=r"attention: positions\[1\] = .* is outside \[0, 8\)"):
        ops.attention(q, kc, vc, rows, big, 0.5)
    with pytest.raises(RuntimeError, match=r"attention: rows\[1\] = .* is outside \[0, 2\)"):
        ops.attention(q, kc, vc, big, positions, 0.5)
    cache = ops.rotary_cos_sin_cache(ops.rope_inv_freq(4, 1e4), 8)
    with pytest.raises(RuntimeError, match=r"rotary_embedding: positions\[1\] = .* is outside \[0, 8\)"):
        ops.rotary_embedding(q.clone(), kv.clone(), big, cache)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0  # nothing was written


@pytest.mark.parametrize("user_env,expected", [({}, "None 10000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
                                                  ({"GOMP_SPINCOUNT": "5"}, "None 5")])
def test_openmp_spins_briefly_unless_the_user_chose(user_env, expected):
    """Importing layerskip_ext first bounds the OpenMP workers' spinning to about 0.1 ms (they pay a futex
    wake-up per parallel region when they sleep at once, and steal cores when they spin for long); a user's
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user_env)
    code = ("import layerskip_ext, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == expected, out.stderr
