"""Batched generation: row i of a batch yields exactly the tokens of a batch-1 call with prompt i.

Checked against batch-1 engine calls and the reference (reference_generate.py, whose batched semantics are
per-row batch-1 calls) on conftest's random checkpoints (GQA / MQA / MHA, tied / untied) and SmolLM2: all
three strategies, several (E, d), greedy and seeded sampling, ragged prompts, rows that stop early, B = 1..8,
rows with different settings in one batch, rows added mid-generation (the row interface). Also: the
per-row rejection sampling follows the full model (chi-square), bad batched input names the row, two threads on
one model, re-entry from on_token, a failed add_row leaves nothing behind, non-finite logits raise.
"""
from __future__ import annotations

import collections
import threading

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext.generation import check_generation_args
from chi_square import chi_square, chi_square_limit
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

PROMPTS = [[5, 17, 42, 7, 99, 3, 61], [11, 2], [200, 4, 4, 4, 9, 31, 8, 1, 77, 60, 12, 5, 5], [9],
           [1, 2, 3, 4, 5], [150, 151, 152], [33, 66, 99, 132, 165, 198, 10, 20], [7, 7]]


@pytest.fixture(scope="module")
def random_model(random_checkpoint):
    return layerskip_ext.load(random_checkpoint[1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """2 layers, vocabulary 32: for the many-seed test."""
    directory = tmp_path_factory.mktemp("tiny_batch")
    return layerskip_ext.load(make_hf_checkpoint(directory, seed=3, std=0.25, num_hidden_layers=2, hidden_size=32,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                 vocab_size=32, tie_word_embeddings=True))


def row_kwargs(kwargs: dict, i: int) -> dict:
    """Row i's arguments from batched arguments (per-row lists picked, the rest shared)."""
    out = {}
    for k, v in kwargs.items():
        per_row = isinstance(v, list) and (k != "stop_token_ids" or (v and isinstance(v[0], list)))
        out[k] = v[i] if per_row else v
    return out


def assert_rows_match(model, prompts, reference=True, **kwargs):
    """The batched call against one batch-1 engine call (and the reference) per row; returns the results."""
    kwargs.setdefault("stop_token_ids", [])
    batch = layerskip_ext.generate(model, prompts, backend="engine", **kwargs)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for i, p in enumerate(prompts):
        kw = row_kwargs(kwargs, i)
        alone = layerskip_ext.generate(model, p, backend="engine", **kw)
        assert batch[i].tokens == alone.tokens, (i, kw)
        assert batch[i].finish_reason == alone.finish_reason
        s, a = batch[i].stats, alone.stats
        assert (s.drafted, s.accepted, s.rounds, s.new_tokens) == (a.drafted, a.accepted, a.rounds, a.new_tokens)
        assert batch[i].prompt_tokens == list(p)
        if reference:
            ref = layerskip_ext.generate(model, p, backend="reference", **kw)
            assert batch[i].tokens == ref.tokens and batch[i].finish_reason == ref.finish_reason, (i, kw)
    return batch


def strategies(L: int):
    mid = max(1, L // 2)
    return [dict(strategy="autoregressive"), dict(strategy="early_exit", exit_layer=mid),
            dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
            dict(strategy="self_speculative", exit_layer=L - 1, num_speculations=5),
            dict(strategy="self_speculative", exit_layer=mid, num_speculations=1)]


# ----------------------------------------------------------------------------------------------
# batched == batch 1


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=11), dict(temperature=1.1, top_k=20,
                                                                                     top_p=0.9, seed=3)])
def test_batched_rows_equal_batch1(random_model, sampling):
    """Ragged prompts, every strategy, rows with their own max_new_tokens (some stop early)."""
    V = random_model.config.vocab_size
    prompts = [[t % V for t in p] for p in PROMPTS[:5]]
    for kw in strategies(random_model.num_layers):
        assert_rows_match(random_model, prompts, max_new_tokens=[14, 3, 14, 1, 9], **kw, **sampling)


def test_batch_sizes_1_to_8(random_model):
    V = random_model.config.vocab_size
    prompts = [[t % V for t in p] for p in PROMPTS]
    kw = dict(strategy="self_speculative", exit_layer=1, num_speculations=4, max_new_tokens=10)
    for B in range(1, 9):
        assert_rows_match(random_model, prompts[:B], reference=B in (1, 8), **kw)
    assert_rows_match(random_model, prompts, reference=False, max_new_tokens=8, temperature=0.9,
                      seed=[1, 2, 3, 4, 5, 6, 7, 8])


def test_rows_with_different_settings_in_one_batch(random_model):
    """One batch mixing strategies, exits, draft lengths, greedy / sampled rows, stop ids and context limits: the
    engine groups rows by (strategy, E, d) and every row still equals its batch-1 call."""
    L, V = random_model.num_layers, random_model.config.vocab_size
    prompts = [[t % V for t in p] for p in PROMPTS[:6]]
    free = layerskip_ext.generate(random_model, prompts[1], max_new_tokens=10, stop_token_ids=[], backend="engine")
    kw = dict(strategy=["autoregressive", "self_speculative", "self_speculative", "early_exit", "self_speculative",
                        "self_speculative"],
              exit_layer=[None, 1, 1, max(1, L // 2), L - 1, 1], num_speculations=[None, 3, 3, None, 2, 3],
              temperature=[0.0, 0.0, 0.7, 0.9, 0.0, 1.0], seed=[0, 1, 2, 3, 4, 5], max_new_tokens=12,
              stop_token_ids=[[], [free.tokens[4]], [], [], [], []],
              context_length=[256, 256, 256, 256, len(prompts[4]) + 5, 256])
    batch = assert_rows_match(random_model, prompts, **kw)
    assert batch[1].finish_reason == "stop" and batch[4].finish_reason == "context"


def test_streaming_in_batched_mode_gets_row_and_token(random_model):
    V = random_model.config.vocab_size
    prompts = [[t % V for t in p] for p in PROMPTS[:3]]
    streamed = collections.defaultdict(list)
    results = layerskip_ext.generate(random_model, prompts, max_new_tokens=[9, 4, 9], stop_token_ids=[],
                                     strategy="self_speculative", exit_layer=1, num_speculations=3,
                                     on_token=lambda row, token: streamed[row].append(token), backend="engine")
    assert {i: r.tokens for i, r in enumerate(results)} == dict(streamed)
    ref = layerskip_ext.generate(random_model, prompts, max_new_tokens=[9, 4, 9], stop_token_ids=[],
                                 strategy="self_speculative", exit_layer=1, num_speculations=3, backend="reference")
    assert [r.tokens for r in ref] == [r.tokens for r in results]


def test_row_interface_continuous_batching(random_model):
    """Rows added while others run and removed at once each equal their batch-1 call."""
    cfg, V = random_model.config, random_model.config.vocab_size
    engine = engine_mod.Engine(random_model, max_rows=2, capacity=16)

    def args(prompt, **kw):
        base = dict(max_new_tokens=10, strategy="self_speculative", exit_layer=1, num_speculations=2,
                    temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_token_ids=[], context_length=256)
        base.update(kw)
        return check_generation_args(cfg, None, [t % V for t in prompt], **base)

    a = args(PROMPTS[0])
    b = args(PROMPTS[1], strategy="autoregressive", exit_layer=None, num_speculations=None, temperature=0.7, seed=9)
    c = args(PROMPTS[2], max_new_tokens=6)
    row_a = engine.add_row(a)
    streamed = collections.defaultdict(list)
    for _ in range(3):
        for row, tokens in engine.step():
            streamed[row] += tokens
    row_b, row_c = engine.add_row(b), engine.add_row(c)  # grows the cache rows and positions, keeps row a's
    removed = False
    while engine._engine.has_unfinished():
        for row, tokens in engine.step():
            streamed[row] += tokens
        if not removed and engine.finish_reason(row_c) is not None:
            engine.remove_row(row_c)  # released at once; the others go on
            removed = True
    assert removed and engine._engine.row_ids() == [row_a, row_b]
    for row, a_ in ((row_a, a), (row_b, b)):
        expected = layerskip_ext.generate(random_model, a_.prompt_ids, **_kwargs(a_), backend="engine").tokens
        assert engine.result(row, a_).tokens == streamed[row] == expected
    assert streamed[row_c] == layerskip_ext.generate(random_model, c.prompt_ids, **_kwargs(c), backend="engine").tokens
    with pytest.raises(RuntimeError, match="no row with id"):
        engine.remove_row(row_c)


def _kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, strategy=args.strategy, exit_layer=args.exit_layer,
                num_speculations=args.num_speculations, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop_token_ids=list(args.stop_token_ids),
                context_length=args.context_length)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp32", "bf16", "q8_0", "q4_0"])
def test_rows_prefilled_in_shared_passes_equal_batch1(tmp_path, weights):
    """New rows prefill together (Engine::prefill_passes): float rows while a pass stays within the skinny
    kernel's 64 tokens, packed rows up to 512; prompts of 1-130 tokens, so that passes hold one row, several,
    or a row too long to share, in every strategy and with sampling."""
    model = layerskip_ext.load(make_hf_checkpoint(tmp_path, seed=5, num_hidden_layers=4, hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                                  vocab_size=300, max_position_embeddings=512), weights=weights)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (70, 5, 30, 40, 64, 1, 130, 12)]
    for kw in strategies(model.num_layers) + [dict(temperature=0.9, top_k=50, seed=4)]:
        assert_rows_match(model, prompts, reference=False, max_new_tokens=6, **kw)


def test_smollm2_batched_rows_equal_batch1(smollm2):
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    for kw in (dict(), dict(strategy="self_speculative", exit_layer=8, num_speculations=3),
               dict(temperature=0.7, seed=5, strategy="self_speculative", exit_layer=12, num_speculations=2)):
        batch = layerskip_ext.generate(smollm2, prompts, max_new_tokens=[16, 6, 16], stop_token_ids=[],
                                       backend="engine", **kw)
        for i, p in enumerate(prompts):
            alone = layerskip_ext.generate(smollm2, p, max_new_tokens=[16, 6, 16][i], stop_token_ids=[],
                                           backend="engine", **kw)
            assert batch[i].tokens == alone.tokens, (i, kw)


# ----------------------------------------------------------------------------------------------
# per-row rejection sampling keeps the full model's distribution


def test_batched_self_speculative_sampling_follows_full_model(tiny_model):
    """Token 2 of many seeded rows (8 per batch, each with its own seed), given the most frequent token 1, is
    distributed as the full model says (chi-square), and not as the draft (layer 1) says."""
    N, B, E, d, temp = 2000, 8, 1, 3, 1.0
    prompt = [5, 17, 30]
    firsts, seconds = [], collections.defaultdict(list)
    for start in range(0, N, B):
        results = layerskip_ext.generate(tiny_model, [prompt] * B, max_new_tokens=2, strategy="self_speculative",
                                         exit_layer=E, num_speculations=d, temperature=temp,
                                         seed=list(range(start, start + B)), stop_token_ids=[], backend="engine")
        for r in results:
            firsts.append(r.tokens[0])
            seconds[r.tokens[0]].append(r.tokens[1])
    t1 = collections.Counter(firsts).most_common(1)[0][0]
    observed = torch.bincount(torch.tensor(seconds[t1]), minlength=tiny_model.config.vocab_size).double()
    ids = torch.tensor([prompt + [t1]])
    with torch.no_grad():
        full = torch.softmax(tiny_model.module(ids)[0, -1].double() / temp, -1)
        draft = torch.softmax(tiny_model.module(ids, exit_layer=E)[0, -1].double() / temp, -1)

    stat_full, dof = chi_square(observed, full)
    stat_draft, _ = chi_square(observed, draft)
    limit = chi_square_limit(dof)
    assert stat_full < limit, (stat_full, dof)
    assert stat_draft > limit, "the test cannot tell the draft from the full model: change the model"


# ----------------------------------------------------------------------------------------------
# bad input names the row


def test_bad_batched_input_names_the_row(random_model):
    m, V = random_model, random_model.config.vocab_size
    ctx = m.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt is empty: an empty list is neither a prompt nor a batch"):
        layerskip_ext.generate(m, [])
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is empty"):
        layerskip_ext.generate(m, [[1, 2], []])
    with pytest.raises(ValueError, match=r"prompts\[2\]: prompt has 300 tokens"):
        layerskip_ext.generate(m, [[1], [2], [3] * 300])
    with pytest.raises(ValueError, match=r"prompts\[1\]: a prompt must be a string or a list of token ids"):
        layerskip_ext.generate(m, [[1, 2], 3])
    with pytest.raises(ValueError, match=r"prompts\[0\]: prompt is a string but the model has no tokenizer"):
        layerskip_ext.generate(m, ["hello", [1, 2]])
    with pytest.raises(ValueError, match=rf"prompts\[1\]: prompt token ids: token id {V} is out of range"):
        layerskip_ext.generate(m, [[1, 2], [3, V]])
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt token ids: token id -1 is out of range"):
        layerskip_ext.generate(m, [[1, 2], [-1]])
    with pytest.raises(ValueError, match="max_new_tokens has 3 values for 2 prompts"):
        layerskip_ext.generate(m, [[1], [2]], max_new_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"prompts\[1\]: temperature must be 0 \(greedy\) or a number in"):
        layerskip_ext.generate(m, [[1], [2]], temperature=[0.5, -1.0])
    assert ctx >= 256
    # after every failure the model still generates, and the engine holds no leftover rows
    engine = engine_mod.get_engine(m)
    assert engine._engine.row_ids() == []
    assert_rows_match(m, [[1, 2], [3]], reference=False, max_new_tokens=4)


def test_huge_max_new_tokens_is_clamped_by_the_context(random_model):
    results = layerskip_ext.generate(random_model, [[1, 2, 3], [4]], max_new_tokens=2**62, context_length=12,
                                     stop_token_ids=[], strategy="self_speculative", exit_layer=1,
                                     num_speculations=4, backend="engine")
    assert [len(r.tokens) for r in results] == [9, 11]
    assert all(r.finish_reason == "context" for r in results)
    one = layerskip_ext.generate(random_model, [1, 2, 3], max_new_tokens=2**70, context_length=8, stop_token_ids=[],
                                 backend="engine")
    assert len(one.tokens) == 5 and one.finish_reason == "context"


# ----------------------------------------------------------------------------------------------
# engine state: concurrency, re-entry, failed calls, non-finite logits


def test_two_threads_on_one_model_match_sequential(random_model):
    V = random_model.config.vocab_size
    jobs = [dict(prompt=[t % V for t in PROMPTS[0]], max_new_tokens=16),
            dict(prompt=[[t % V for t in p] for p in PROMPTS[1:4]], max_new_tokens=12, strategy="self_speculative",
                 exit_layer=1, num_speculations=3, temperature=0.8, seed=4)]
    expected = [layerskip_ext.generate(random_model, stop_token_ids=[], backend="engine", **j) for j in jobs]
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(4):
                out = layerskip_ext.generate(random_model, stop_token_ids=[], backend="engine", **jobs[i])
                got.setdefault(i, []).append(out)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tokens = lambda r: [x.tokens for x in r] if isinstance(r, list) else r.tokens  # noqa: E731
    for i in range(2):
        assert all(tokens(out) == tokens(expected[i]) for out in got[i])


def test_generate_inside_on_token_raises_and_leaves_model_usable(random_model):
    inner_errors = []

    def callback(token):
        try:
            layerskip_ext.generate(random_model, [1, 2], max_new_tokens=2, backend="engine")
        except RuntimeError as e:
            inner_errors.append(str(e))

    out = layerskip_ext.generate(random_model, [1, 2, 3], max_new_tokens=5, stop_token_ids=[], on_token=callback,
                                 backend="engine")
    alone = layerskip_ext.generate(random_model, [1, 2, 3], max_new_tokens=5, stop_token_ids=[], backend="engine")
    assert out.tokens == alone.tokens
    assert len(inner_errors) == 5 and "inside an on_token callback" in inner_errors[0]

    def raising(token):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        layerskip_ext.generate(random_model, [[1, 2], [3]], max_new_tokens=5, on_token=lambda r, t: raising(t),
                               backend="engine")
    assert engine_mod.get_engine(random_model)._engine.row_ids() == []
    assert layerskip_ext.generate(random_model, [1, 2, 3], max_new_tokens=5, stop_token_ids=[],
                                  backend="engine").tokens == alone.tokens


def test_failed_add_row_leaves_no_state(random_model):
    cfg, V = random_model.config, random_model.config.vocab_size
    engine = engine_mod.Engine(random_model)
    good = check_generation_args(cfg, None, [1, 2, 3], max_new_tokens=6, strategy="autoregressive", exit_layer=None,
                                 num_speculations=None, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                 stop_token_ids=[], context_length=64)
    expected = engine.generate(good).tokens
    e = engine._engine
    bad_calls = [
        lambda: e.add_row(torch.tensor([1, V]), "autoregressive", 0, 1, 5, 0.0, 0, 1.0, 0, torch.tensor([], dtype=torch.int64), 64),
        lambda: e.add_row(torch.tensor([1]), "self_speculative", cfg.num_layers, 2, 5, 0.0, 0, 1.0, 0, torch.tensor([], dtype=torch.int64), 64),
        lambda: e.add_row(torch.tensor([1]), "autoregressive", 0, 1, 5, 0.0, 0, 1.0, 0, torch.tensor([], dtype=torch.int64), 10**6),
        lambda: e.add_row(torch.tensor([1]), "beam", 0, 1, 5, 0.0, 0, 1.0, 0, torch.tensor([], dtype=torch.int64), 64),
        lambda: e.add_row(torch.tensor([1]), "autoregressive", 0, 1, -1, 0.0, 0, 1.0, 0, torch.tensor([], dtype=torch.int64), 64),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError, match="Engine: "):
            call()
        assert e.row_ids() == [] and not e.has_unfinished()
    assert engine.generate(good).tokens == expected


def test_non_finite_logits_raise_a_clear_error(tmp_path):
    model = layerskip_ext.load(make_hf_checkpoint(tmp_path, seed=1, num_hidden_layers=2, hidden_size=32,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                  vocab_size=40))
    with torch.no_grad():
        model.module.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    for kw in (dict(), dict(strategy="self_speculative", exit_layer=1, num_speculations=2),
               dict(temperature=0.9, seed=1)):
        with pytest.raises(RuntimeError, match="row 0 failed: non-finite logits"):
            layerskip_ext.generate(model, [[1, 2], [3, 4]], max_new_tokens=4, backend="engine", **kw)
        assert engine_mod.get_engine(model)._engine.row_ids() == []


def test_batch_reserves_the_cache_once_checks_memory_and_gives_it_back(monkeypatch):
    """A batch grows the KV cache once for all its rows (row by row, each add past the allocated rows copied the
    whole cache: 200 prompts took 4x their serial time; an audit's find); a cache the machine cannot hold is a
    LayerSkipError naming the sizes (not a process killed for memory); a large cache is freed when the call ends."""
    import os
    model = layerskip_ext.load(os.path.join(os.path.dirname(__file__), "..", "checkpoints", "layerskip-demo"))
    engine = engine_mod.get_engine(model)
    prompts = [[5 + i, 17, 42][: 1 + i % 3] for i in range(12)]
    alone = [layerskip_ext.generate(model, p, max_new_tokens=5, stop_token_ids=[]).tokens for p in prompts]
    grows = []
    cpp = engine._engine
    monkeypatch.setattr(engine, "_engine", _Spy(engine._engine, lambda rows, cap: grows.append(rows)))
    batch = [r.tokens for r in layerskip_ext.generate(model, prompts, max_new_tokens=5, stop_token_ids=[])]
    assert batch == alone and grows == [12]  # one reservation for the 12 rows
    assert cpp.max_rows() >= 12  # a small cache is kept for the next call
    monkeypatch.setattr(engine_mod, "_KEEP_CACHE_BYTES", 0)
    layerskip_ext.generate(model, prompts, max_new_tokens=5, stop_token_ids=[])
    assert cpp.cache_bytes() == 0  # freed; the next call allocates again
    assert [r.tokens for r in layerskip_ext.generate(model, prompts, max_new_tokens=5, stop_token_ids=[])] == alone
    monkeypatch.setattr(engine_mod, "available_memory", lambda device: 1 << 10)
    with pytest.raises(layerskip_ext.LayerSkipError, match=r"KV cache for 12 rows of up to \d+ positions needs"):
        layerskip_ext.generate(model, prompts, max_new_tokens=5, stop_token_ids=[])
    monkeypatch.undo()
    assert layerskip_ext.generate(model, prompts[0], max_new_tokens=5, stop_token_ids=[]).tokens == alone[0]


class _Spy:
    """The C++ engine with its reserve() calls reported to `on_reserve` (rows, capacity)."""

    def __init__(self, inner, on_reserve):
        self._inner, self._on_reserve = inner, on_reserve

    def reserve(self, rows, capacity):
        self._on_reserve(rows, capacity)
        return self._inner.reserve(rows, capacity)

    def __getattr__(self, name):
        return getattr(self._inner, name)
