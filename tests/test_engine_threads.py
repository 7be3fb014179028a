"""The engine's thread cap (csrc/cpu/parallel.h, engine.default_threads / free_cores): output is the same on
any number of threads, the default follows LAYERSKIP_THREADS and the machine's load, bad values are refused."""
from __future__ import annotations

import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext.generation import check_generation_args
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # wide enough that linear, attention and the LM head split across threads when uncapped
    directory = tmp_path_factory.mktemp("threads")
    return layerskip_ext.load(make_hf_checkpoint(directory, seed=5, num_hidden_layers=3, hidden_size=256,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=1024, vocab_size=4096))


@pytest.mark.parametrize("kw", [dict(strategy="autoregressive"),
                                dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
                                dict(strategy="autoregressive", temperature=0.9, top_p=0.9, seed=4)])
def test_same_tokens_on_one_and_all_threads(model, kw):
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 torch threads to compare with one")
    engine = engine_mod.get_engine(model)
    prompts = [[5, 17, 42, 7], [3, 99, 1000, 12, 8, 1]]
    runs = {}
    try:
        for threads in (1, 0):
            engine.threads = threads
            assert engine.threads == threads
            runs[threads] = [r.tokens for r in layerskip_ext.generate(model, prompts, max_new_tokens=20,
                                                                       stop_token_ids=[], **kw)]
    finally:
        engine.threads = engine_mod.default_threads()
    assert runs[1] == runs[0]
    assert all(len(t) == 20 for t in runs[1])


def test_default_threads_follow_env(monkeypatch, model):
    monkeypatch.delenv("LAYERSKIP_THREADS", raising=False)
    assert engine_mod.default_threads() == 0
    assert engine_mod.Engine(model).threads == 0
    monkeypatch.setenv("LAYERSKIP_THREADS", "3")
    assert engine_mod.default_threads() == 3
    assert engine_mod.Engine(model).threads == 3
    for bad in ("-1", "two", "1.5", "99999"):
        monkeypatch.setenv("LAYERSKIP_THREADS", bad)
        with pytest.raises(ValueError, match="LAYERSKIP_THREADS"):
            engine_mod.default_threads()


def test_engine_runs_on_the_free_cores(model, monkeypatch):
    monkeypatch.delenv("LAYERSKIP_THREADS", raising=False)
    monkeypatch.setattr(engine_mod.torch, "get_num_threads", lambda: 4)
    engine = engine_mod.Engine(model)
    seen = []
    for free in (0, 1, 3, 4, 8, None):
        monkeypatch.setattr(engine_mod, "free_cores", lambda free=free: free)
        engine._threads_checked = 0.0
        engine._adapt_threads(engine._engine)
        seen.append(engine.threads)
    assert seen == [1, 1, 3, 0, 0, 0]  # 0: no cap (torch's count)


@pytest.mark.parametrize("bad", [-1, 4097, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(model, bad):
    engine = engine_mod.get_engine(model)
    with pytest.raises(ValueError, match="threads"):
        engine.threads = bad


def test_free_cores_first_reading_counts_runnable_threads(monkeypatch):
    # no earlier reading: procs_running less this process's own runnable threads (the caller at least)
    import io

    cores = len(engine_mod.os.sched_getaffinity(0))
    real_open = open
    monkeypatch.setattr(engine_mod, "_own_running_threads", lambda: 2)
    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: cores)  # the machine is ours alone
    for running, expected in ((1, cores), (2, cores), (3, cores - 1), (cores + 2, 0), (cores + 9, 0)):
        engine_mod._last_sample.clear()
        text = f"cpu  1 2 3 4 5 6 7 8 9 10\nprocs_running {running}\nprocs_blocked 0\n".encode()
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.BytesIO(text) if path == "/proc/stat"
                            else real_open(path, *a, **k))
        assert engine_mod.free_cores() == max(expected, 0)
    engine_mod._last_sample.clear()


def test_free_cores_averages_other_processes_cpu_time(monkeypatch):
    """After a first reading: the CPU time other processes used since the previous one, in cores."""
    monkeypatch.setattr(engine_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(engine_mod, "_runnable_others", lambda: 0.0)
    clock, busy, own = [100.0], [0.0], [0.0]
    monkeypatch.setattr(engine_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(engine_mod, "_cpu_seconds", lambda: (busy[0], own[0]))
    engine_mod._last_sample.clear()
    assert engine_mod.free_cores() == 2  # first reading: nothing runnable
    seen = []
    # per second: (machine busy, ours): we use 2 cores and others 0.4 / 1.0 / 1.8 / 0
    for machine, ours in ((2.4, 2.0), (2.0, 1.0), (2.8, 1.0), (2.0, 2.0)):
        clock[0] += 1.0
        busy[0] += machine
        own[0] += ours
        seen.append(engine_mod.free_cores())
    assert seen == [2, 1, 0, 2]
    clock[0] += 0.1  # too soon after the last reading: its result again
    busy[0] += 5.0
    assert engine_mod.free_cores() == 2
    clock[0] += 2.0  # a pause in which another program kept both cores busy (it has ended since): a fresh
    busy[0] += 4.0   # snapshot, not the average over the pause
    assert engine_mod.free_cores() == 2
    engine_mod._last_sample.clear()


def test_free_cores_counts_others_on_our_share_of_the_cpus(monkeypatch):
    # pinned to 2 of 64 CPUs: 31 other runnable threads on the host are about one on our two cores
    monkeypatch.setattr(engine_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(engine_mod, "_cpu_seconds", lambda: (0.0, 0.0))
    for others, expected in ((0, 2), (31, 1), (63, 0), (199, 0)):
        engine_mod._last_sample.clear()
        monkeypatch.setattr(engine_mod, "_runnable_others", lambda others=others: float(others))
        assert engine_mod.free_cores() == expected, others
    engine_mod._last_sample.clear()


def test_cpu_seconds_and_own_threads_read_this_machine():
    busy, own = engine_mod._cpu_seconds()
    assert busy > 0 and own > 0
    assert engine_mod._own_running_threads() >= 1


@pytest.mark.parametrize("cores, torch_threads, expected", [(2, 2, 1), (1, 1, 1), (8, 8, 7), (16, 4, 3)])
def test_a_server_engine_leaves_a_core_to_its_event_loop(model, monkeypatch, cores, torch_threads, expected):
    """leave_cores(1) (the server's engine): at most min(cores, torch's threads) - 1 threads, at least one, and
    still adapting to other processes; an explicit thread count is kept."""
    monkeypatch.delenv("LAYERSKIP_THREADS", raising=False)
    monkeypatch.setattr(engine_mod.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    eng = engine_mod.Engine(model, torch.float32, max_rows=2)
    eng.leave_cores(1)
    assert eng.threads == expected and eng._auto_threads
    fixed = engine_mod.Engine(model, torch.float32, max_rows=2)
    fixed.threads = 2
    fixed.leave_cores(1)
    assert fixed.threads == 2
    tokens = layerskip_ext.generate(model, [3, 5, 7], max_new_tokens=6, stop_token_ids=[]).tokens
    row = eng.add_row(check_generation_args(
        model.config, model.tokenizer, [3, 5, 7], max_new_tokens=6, strategy="autoregressive",
        exit_layer=None, num_speculations=None, temperature=0.0, top_k=0, top_p=1.0, seed=None,
        stop_token_ids=[], context_length=model.config.max_position_embeddings))
    while eng._engine.has_unfinished():
        eng.step()
    assert eng._engine.tokens(row).tolist() == tokens  # same tokens on the capped engine


def test_work_pool_switch_is_read_by_the_extension():
    """ops.work_pool_enabled answers from the extension's own reading of LAYERSKIP_WORK_POOL (the server leaves a
    core to its event loop only when it is off)."""
    import subprocess
    import sys
    code = "from layerskip_ext import ops; print(ops.work_pool_enabled())"
    for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "LAYERSKIP_WORK_POOL"}
        if value is not None:
            env["LAYERSKIP_WORK_POOL"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected, (value, out.stdout)


def test_rows_left_by_an_interrupted_clean_up_are_removed(model):
    """A KeyboardInterrupt inside generate()'s clean-up could leave rows in the model's engine, and every later
    generate() raised "needs an engine with no rows" (an audit's find): such rows are now removed first. Rows
    added through the public row interface still make generate() refuse."""
    prompt = [5, 17, 42, 7]
    expected = layerskip_ext.generate(model, prompt, max_new_tokens=6, stop_token_ids=[]).tokens
    engine = engine_mod.get_engine(model)
    args = check_generation_args(model.config, None, prompt, max_new_tokens=6, strategy="autoregressive",
                                 exit_layer=None, num_speculations=None, temperature=0.0, top_k=0, top_p=1.0,
                                 seed=None, stop_token_ids=[], context_length=model.config.max_position_embeddings)
    with engine._exclusive() as e:  # what an interrupted clean-up leaves: a row of generate's own
        engine._add(e, args)
        assert len(e.row_ids()) == 1
    assert layerskip_ext.generate(model, prompt, max_new_tokens=6, stop_token_ids=[]).tokens == expected
    own = engine_mod.Engine(model)
    own.add_row(args)
    with pytest.raises(RuntimeError, match="add_row"):
        own.generate(args)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_during_a_generation_leaves_the_child_usable(model):
    """A fork while another thread runs a generation copied the engine's lock held: the child's next generate()
    waited for ever (an audit's find). The child now gets fresh locks and a new engine for the busy one."""
    import multiprocessing
    import threading
    prompt = [5, 17, 42, 7]
    expected = layerskip_ext.generate(model, prompt, max_new_tokens=6, stop_token_ids=[]).tokens
    started = threading.Event()

    def long_generation():
        layerskip_ext.generate(model, prompt, max_new_tokens=400, stop_token_ids=[],
                               on_token=lambda t: started.set())

    thread = threading.Thread(target=long_generation)
    thread.start()
    started.wait(30)
    assert engine_mod.get_engine(model)._lock.locked()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(
        layerskip_ext.generate(model, prompt, max_new_tokens=6, stop_token_ids=[]).tokens))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
        thread.join()
    assert got == expected
