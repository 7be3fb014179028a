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
    (dict(stop_token_ids="ab"), "stop_token_ids must be a list"),
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weights_give_a_clear_error_not_garbage_tokens(tmp_path, backend):
    """A broken model (NaN in the final norm: every logit NaN) is an error naming the row on both backends, every
    strategy (the reference returned greedy tokens [0, 0, 0, 0], the argmax of NaN, and failed with 'max():
    Expected reduction dim to be specified' when sampling)."""
    directory = make_hf_checkpoint(tmp_path / "m", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=32,
                                   max_position_embeddings=64)
    model = layerskip_ext.load(directory)
    with torch.no_grad():
        model.module.model.norm.weight[3] = float("nan")
    for kwargs in (dict(), dict(temperature=0.7, seed=1), dict(strategy="self_speculative", exit_layer=1),
                   dict(strategy="self_speculative", exit_layer=1, temperature=0.7, seed=1),
                   dict(strategy="early_exit", exit_layer=1)):
        with pytest.raises(RuntimeError, match=r"generation of row 0 failed: .*NaN or infinite logits"):
            layerskip_ext.generate(model, [PROMPT, PROMPT[:3]], max_new_tokens=4, backend=backend, **kwargs)
        with pytest.raises(RuntimeError, match="finite"):
            layerskip_ext.generate(model, PROMPT, max_new_tokens=4, backend=backend, **kwargs)


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


# ---------------------------------------------------------------------------------------------------
# found by the robustness audit: each failed before its fix (an unclear TypeError / RuntimeError, a backend
# refusing what the other accepts, or an IndexError deep in the model)


@pytest.mark.parametrize("top_k", [32, 33, 1000, 2**63, 2**70])
def test_top_k_at_or_past_the_vocabulary_keeps_every_token(tiny, backend, top_k):
    """top_k >= vocabulary filters nothing: the tokens of top_k = vocabulary size, on both backends (2**70 gave
    the engine's 'Expected a value of type int' binding error)."""
    kwargs = dict(max_new_tokens=8, temperature=0.9, seed=11, strategy="self_speculative", exit_layer=2)
    assert gen(backend, tiny, top_k=top_k, **kwargs).tokens == gen("reference", tiny, top_k=32, **kwargs).tokens


@pytest.mark.parametrize("d", [1025, 10**6, 2**63, 2**70])
def test_num_speculations_past_the_limit_is_a_layerskip_error_on_both_backends(tiny, backend, d):
    """The engine drafts at most 1024 tokens a round; the reference accepted any count, the engine raised a
    RuntimeError (or a binding error past int64). Now both refuse with the range; 1024 itself runs."""
    with pytest.raises(LayerSkipError, match=r"num_speculations must be an integer in \[1, 1024\]"):
        gen(backend, tiny, max_new_tokens=4, strategy="self_speculative", exit_layer=2, num_speculations=d)
    full = gen(backend, tiny, max_new_tokens=12)
    assert gen(backend, tiny, max_new_tokens=12, strategy="self_speculative", exit_layer=2,
               num_speculations=1024).tokens == full.tokens


@pytest.mark.parametrize("stop", [5, np.int64(5), 2.0, "5", object()])
def test_stop_token_ids_that_is_not_a_list_names_the_argument(tiny, backend, stop):
    """A bare integer raised TypeError: 'int' object is not iterable."""
    with pytest.raises(LayerSkipError, match="stop_token_ids must be a list of token ids"):
        layerskip_ext.generate(tiny, PROMPT, max_new_tokens=3, stop_token_ids=stop, backend=backend)


def test_numpy_and_tensor_floats_for_draft_threshold(tiny, backend):
    """Every other float argument takes numpy / 0-d tensor scalars; draft_threshold refused them."""
    kwargs = dict(max_new_tokens=8, strategy="self_speculative", exit_layer=2, num_speculations=3)
    expected = gen(backend, tiny, draft_threshold=0.25, **kwargs)
    for value in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        got = gen(backend, tiny, draft_threshold=value, **kwargs)
        assert got.tokens == expected.tokens and got.stats.rounds == expected.stats.rounds
    for bad in (True, "0.3", float("nan"), np.float64(1.5), torch.tensor([0.3])):
        with pytest.raises(LayerSkipError, match="draft_threshold"):
            gen(backend, tiny, draft_threshold=bad, **kwargs)


@pytest.mark.parametrize("weight_dtype", ["int8", torch.float16, 3, "packed"])
def test_bad_weight_dtype_is_refused_on_every_backend(tiny, backend, weight_dtype):
    """The reference backend ignored weight_dtype entirely, so a typo passed unnoticed; 'packed' on a float model
    raised a plain ValueError."""
    with pytest.raises(LayerSkipError, match="weight_dtype"):
        gen(backend, tiny, max_new_tokens=3, weight_dtype=weight_dtype)


def test_seeds_of_any_size_and_sign_agree_between_backends(tiny):
    """Seeds are taken modulo 2**64 (sampling.seed_as_int64) by both backends alike."""
    for seed in (-1, -5, 2**63, 2**64 - 1, 2**200 + 3, np.uint64(2**64 - 1), np.int64(-7)):
        kwargs = dict(max_new_tokens=10, temperature=1.0, seed=seed, strategy="self_speculative", exit_layer=2)
        ref, eng = gen("reference", tiny, **kwargs), gen("engine", tiny, **kwargs)
        assert ref.tokens == eng.tokens, seed
        assert gen("engine", tiny, **kwargs).tokens == eng.tokens
    assert gen("engine", tiny, max_new_tokens=10, temperature=1.0, seed=2**64 + 9).tokens == \
        gen("engine", tiny, max_new_tokens=10, temperature=1.0, seed=9).tokens


@pytest.fixture(scope="module")
def oversized_tokenizer_model(tmp_path_factory):
    """A 40-token model whose tokenizer.json has ~300 tokens (a tokenizer from another model)."""
    import os
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("tok") / "m", num_hidden_layers=2, hidden_size=32,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=40, max_position_embeddings=64)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    return layerskip_ext.load(directory)


def test_string_prompt_encoding_past_the_vocabulary_names_the_mismatch(oversized_tokenizer_model, backend):
    """The reference raised IndexError from the embedding, the engine a RuntimeError; now both name the token
    and the vocabulary, and the model stays usable."""
    model = oversized_tokenizer_model
    assert max(model.encode("the quick fox")) >= 40
    with pytest.raises(LayerSkipError, match=r"prompt encodes to token id \d+, outside the model's vocabulary of "
                                             r"40 \(is the tokenizer the model's\?\)"):
        layerskip_ext.generate(model, "the quick fox", max_new_tokens=3, backend=backend)
    with pytest.raises(LayerSkipError, match=r"prompts\[1\]: prompt encodes to token id"):
        layerskip_ext.generate(model, [[1, 2], "the quick fox"], max_new_tokens=3, backend=backend)
    assert len(layerskip_ext.generate(model, [1, 2, 3], max_new_tokens=3, stop_token_ids=[],
                                      backend=backend).tokens) == 3


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exceptions_from_on_token_propagate_and_leave_the_model_usable(tiny, backend, exc):
    """Ctrl-C in a streaming callback: the exception itself comes out, and the next call gives correct tokens."""
    kwargs = dict(max_new_tokens=10, strategy="self_speculative", exit_layer=2, num_speculations=3)
    expected = gen(backend, tiny, **kwargs)
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 2:
            raise exc()

    with pytest.raises(exc):
        gen(backend, tiny, on_token=on_token, **kwargs)
    assert seen == expected.tokens[:2]
    if backend == "engine":
        assert layerskip_ext.engine.get_engine(tiny)._engine.row_ids() == []
    assert gen(backend, tiny, **kwargs).tokens == expected.tokens
    assert gen(backend, tiny, [PROMPT, PROMPT[:3]], **kwargs)[0].tokens == expected.tokens


# ---------------------------------------------------------------------------------------------------
# the Engine row interface (continuous batching) with bad sizes and ids


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_rows=0), "max_rows"), (dict(max_rows=True), "max_rows"), (dict(max_rows=2.5), "max_rows"),
    (dict(max_rows=2**70), "max_rows"), (dict(max_rows=5000), "max_rows"),
    (dict(capacity=0), "capacity"), (dict(capacity=-3), "capacity"), (dict(capacity=1.5), "capacity"),
    (dict(capacity=65), "capacity"),  # past max_position_embeddings: 10**9 tried to allocate 32 GB
    (dict(capacity=10**9), "capacity"), (dict(capacity=2**70), "capacity"),
])
def test_engine_sizes_are_checked_before_anything_is_allocated(tiny, kwargs, match):
    """These raised binding errors ('Expected a value of type Dict[str, int]'), 'upper bound and lower bound
    inconsistent with step sign', an allocation failure or OverflowError; bools passed as integers."""
    with pytest.raises(LayerSkipError, match=f"{match} must be an integer in"):
        layerskip_ext.engine.Engine(tiny, torch.float32, **kwargs)


def test_engine_row_ids_and_arguments_are_checked(tiny):
    from layerskip_ext.generation import check_generation_args
    engine = layerskip_ext.engine.Engine(tiny, torch.float32, max_rows=2)
    args = check_generation_args(tiny.config, None, PROMPT, max_new_tokens=5, strategy="autoregressive",
                                 exit_layer=None, num_speculations=None, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                 stop_token_ids=[], context_length=64)
    with pytest.raises(TypeError, match="add_row needs the GenerationArgs of check_generation_args"):
        engine.add_row("junk")
    row = engine.add_row(args)
    for bad in ("x", None, True, 2**70, 1.0):  # True removed row 1; the others were binding errors
        for call in (engine.remove_row, engine.finish_reason, lambda r: engine.result(r, args)):
            with pytest.raises(LayerSkipError, match="row must be a row id from add_row"):
                call(bad)
    while engine.finish_reason(row) is None:
        engine.step()
    assert engine.result(row, args).tokens == gen("engine", tiny, max_new_tokens=5).tokens
    engine.remove_row(row)


def test_stream_refuses_a_batch_of_prompts(tiny):
    """stream() of a list of prompts raised 'on_token() takes 1 positional argument but 2 were given' from its
    worker thread; it takes one prompt, and says so at once."""
    for batch in ([PROMPT, PROMPT[:3]], [np.array(PROMPT)]):
        with pytest.raises(LayerSkipError, match="stream.. takes one prompt"):
            layerskip_ext.stream(tiny, batch, max_new_tokens=3)
    pieces = layerskip_ext.stream(tiny, PROMPT, max_new_tokens=3, stop_token_ids=[])
    assert list(pieces) == [] and pieces.result.tokens == gen("engine", tiny, max_new_tokens=3).tokens


def test_very_long_stop_strings_hold_nothing_back_wrongly(oversized_tokenizer_model, backend):
    """A stop string far longer than any output (100k characters, 1000 of them) never matches: the text is the
    plain generation's, and the stream's pieces still concatenate to it."""
    model = oversized_tokenizer_model
    kwargs = dict(max_new_tokens=12, stop_token_ids=[], backend=backend)
    plain = layerskip_ext.generate(model, [1, 2, 3], **kwargs)
    for stop in ("x" * 100_000, ["\u00e9" * 5000 + str(i) for i in range(1000)]):
        result = layerskip_ext.generate(model, [1, 2, 3], stop=stop, **kwargs)
        assert (result.tokens, result.text, result.finish_reason) == (plain.tokens, plain.text, "length")
        assert "".join(layerskip_ext.stream(model, [1, 2, 3], stop=stop, **kwargs)) == plain.text


def test_threads_with_raising_callbacks_do_not_disturb_each_other(tiny):
    """Six threads on one model, every other call cancelled by its on_token raising: every completed call gives
    the tokens it gives alone, and the engine holds no rows afterwards."""
    import threading
    jobs = [dict(max_new_tokens=12, temperature=0.8, seed=i, strategy=s, exit_layer=E)
            for i, (s, E) in enumerate([("autoregressive", None), ("self_speculative", 1), ("early_exit", 2)] * 2)]
    expected = [gen("engine", tiny, **j).tokens for j in jobs]
    problems = []

    class Cancel(Exception):
        pass

    def cancel_at_3(seen=[]):  # noqa: B006 (a fresh list is passed per call)
        def on_token(token):
            seen.append(token)
            if len(seen) == 3:
                raise Cancel
        return on_token

    def worker(i):
        for rep in range(4):
            try:
                if rep % 2:
                    with pytest.raises(Cancel):
                        gen("engine", tiny, on_token=cancel_at_3([]), **jobs[i])
                elif gen("engine", tiny, **jobs[i]).tokens != expected[i]:
                    problems.append((i, rep))
            except BaseException as e:  # noqa: BLE001  (reported below)
                problems.append((i, rep, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert layerskip_ext.engine.get_engine(tiny)._engine.row_ids() == []


def test_on_token_with_the_wrong_arity_is_refused_before_generating(tiny, backend):
    """A batch calls on_token(row, token), a single prompt on_token(token): the wrong one is a TypeError naming
    the expected arguments before any work, not Python's own error from inside the loop."""
    seen = []
    with pytest.raises(TypeError, match=r"\(row, token\)"):
        gen(backend, tiny, [PROMPT, PROMPT], max_new_tokens=3, on_token=seen.append)
    with pytest.raises(TypeError, match="one argument"):
        gen(backend, tiny, PROMPT, max_new_tokens=3, on_token=lambda row, token: None)
    assert seen == []
    gen(backend, tiny, [PROMPT, PROMPT], max_new_tokens=3, on_token=lambda row, token: seen.append(row))
    gen(backend, tiny, PROMPT, max_new_tokens=3, on_token=lambda *a: seen.append(a))  # varargs fit either
    assert sorted(seen[:6]) == [0, 0, 0, 1, 1, 1] and len(seen) == 9


@pytest.mark.parametrize("strategy", ["autoregressive", "early_exit", "self_speculative"])
@pytest.mark.parametrize("bad", [False, True, 0.0, "", [], "abc", -3, 2.5])
def test_draft_vocab_size_is_checked_for_every_strategy(tiny, strategy, bad):
    """draft_vocab_size must be an integer >= 0 (or None) whatever the strategy, as draft_threshold and adaptive are
    checked: bools and other falsy values were taken as 0, and any value was ignored outside self-speculation."""
    with pytest.raises(ValueError, match="draft_vocab_size"):
        gen("engine", tiny, strategy=strategy, exit_layer=2, max_new_tokens=2, draft_vocab_size=bad)
    assert gen("engine", tiny, strategy=strategy, exit_layer=2, max_new_tokens=2, draft_vocab_size=0).tokens


@pytest.fixture(scope="module")
def demo_model():
    import os
    return layerskip_ext.load(os.path.join(os.path.dirname(__file__), "..", "checkpoints", "layerskip-demo"))


@pytest.mark.parametrize("where", ["prompt", "stop", "chat"])
def test_lone_surrogates_are_errors(demo_model, where):
    """A Python (or JSON) string may hold a lone surrogate, which the tokenizer refused with a bare TypeError
    ("TextInputSequence must be str"): an error naming the argument instead."""
    if where == "prompt":
        call = lambda: layerskip_ext.generate(demo_model, "ab\ud800", max_new_tokens=2)  # noqa: E731
    elif where == "stop":
        call = lambda: layerskip_ext.generate(demo_model, "ab", max_new_tokens=2, stop=["\udc00"])  # noqa: E731
    else:
        call = lambda: layerskip_ext.apply_chat_template(  # noqa: E731
            demo_model, [{"role": "user", "content": "x\ud800"}], chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(layerskip_ext.LayerSkipError, match="not valid Unicode: .* at character [0-9]+ is a lone surrogate"):
        call()


def test_a_model_cannot_be_pickled_and_says_so(demo_model):
    """multiprocessing Pool arguments and spawn pickle their arguments: the error names the model and what to do
    (it was "cannot pickle '_thread.lock' object"; an audit's find)."""
    import pickle
    layerskip_ext.generate(demo_model, [5, 6], max_new_tokens=2)  # with an engine built
    with pytest.raises(TypeError, match="LayerSkipModel cannot be pickled: load it in each process"):
        pickle.dumps(demo_model)
