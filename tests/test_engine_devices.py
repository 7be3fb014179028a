"""The C++ engine on each device (CPU, and CUDA when there is a GPU) against the reference decoder on the CPU:
greedy tokens of every strategy, and seeded sampling giving the same tokens on the device as on the CPU (the
counter-based generator of csrc/random.h runs in the kernels of both). Weights, KV cache and exit-query cache
live on the model's device."""
from __future__ import annotations

import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from conftest import make_hf_checkpoint
from devices import DEVICES

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

PROMPT = [5, 17, 42, 7, 99, 3, 61]
DEMO = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "layerskip-demo")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """4 layers, GQA, untied head."""
    directory = tmp_path_factory.mktemp("devices")
    return make_hf_checkpoint(directory, seed=5, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, vocab_size=257, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def cpu_model(checkpoint):
    return layerskip_ext.load(checkpoint)


def on(device, checkpoint, cpu_model):
    return cpu_model if device == "cpu" else layerskip_ext.load(checkpoint, device=device)


RUNS = [dict(), dict(strategy="early_exit", exit_layer=2),
        dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
        dict(strategy="self_speculative", exit_layer=3, num_speculations=5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_greedy_matches_reference(device, weight_dtype, checkpoint, cpu_model):
    model = on(device, checkpoint, cpu_model)
    assert model.device.type == device
    for kw in RUNS:
        ref = layerskip_ext.generate(cpu_model, PROMPT, max_new_tokens=20, stop_token_ids=[], backend="reference",
                                     **kw)
        eng = layerskip_ext.generate(model, PROMPT, max_new_tokens=20, stop_token_ids=[], backend="engine",
                                     weight_dtype=weight_dtype, **kw)
        if weight_dtype == torch.float32:
            assert eng.tokens == ref.tokens, kw
            assert (eng.stats.drafted, eng.stats.accepted) == (ref.stats.drafted, ref.stats.accepted), kw
        else:  # bf16 weights: compare with the CPU engine on the same weights
            cpu = layerskip_ext.generate(cpu_model, PROMPT, max_new_tokens=20, stop_token_ids=[], backend="engine",
                                         weight_dtype=weight_dtype, **kw)
            assert eng.tokens == cpu.tokens, kw


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_matches_cpu(device, checkpoint, cpu_model):
    model = on(device, checkpoint, cpu_model)
    for kw in [dict(), dict(strategy="self_speculative", exit_layer=2, num_speculations=3)]:
        for seed, top_k, top_p in [(1, 0, 1.0), (7, 20, 0.9)]:
            args = dict(max_new_tokens=20, stop_token_ids=[], temperature=0.8, top_k=top_k, top_p=top_p, seed=seed,
                        **kw)
            ref = layerskip_ext.generate(cpu_model, PROMPT, backend="reference", **args)
            eng = layerskip_ext.generate(model, PROMPT, backend="engine", **args)
            assert eng.tokens == ref.tokens, (kw, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_and_stop_on_device(device, checkpoint, cpu_model):
    model = on(device, checkpoint, cpu_model)
    full = layerskip_ext.generate(model, PROMPT, max_new_tokens=12, stop_token_ids=[], backend="engine",
                                  strategy="self_speculative", exit_layer=2, num_speculations=2)
    seen = []
    streamed = layerskip_ext.generate(model, PROMPT, max_new_tokens=12, stop_token_ids=[full.tokens[5]],
                                      backend="engine", strategy="self_speculative", exit_layer=2,
                                      num_speculations=2, on_token=seen.append)
    assert streamed.tokens == seen == full.tokens[: full.tokens.index(full.tokens[5]) + 1]
    assert streamed.finish_reason == "stop"


@pytest.mark.parametrize("device", DEVICES)
def test_demo_checkpoint_self_speculative(device):
    """The LayerSkip demo model, E=3 d=2 (its best setting): the same tokens on the device as on the CPU."""
    if not os.path.isdir(DEMO):
        pytest.skip("checkpoints/layerskip-demo not present")
    cpu = layerskip_ext.load(DEMO)
    model = cpu if device == "cpu" else layerskip_ext.load(DEMO, device=device)
    prompt = "It is a truth universally acknowledged, that"
    kw = dict(max_new_tokens=32, stop_token_ids=[], strategy="self_speculative", exit_layer=3, num_speculations=2)
    ref = layerskip_ext.generate(cpu, prompt, backend="reference", **kw)
    eng = layerskip_ext.generate(model, prompt, backend="engine", **kw)
    assert eng.tokens == ref.tokens
    assert eng.stats.accepted == ref.stats.accepted


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graphs_give_the_eager_tokens(device, checkpoint, cpu_model):
    """Decode steps and speculative rounds replayed from CUDA graphs (batch 1 and 3, greedy and sampled) give
    the tokens of eager steps; on the CPU nothing is captured."""
    model = on(device, checkpoint, cpu_model)
    engine = engine_mod.get_engine(model)
    prompts = [PROMPT, PROMPT[:4], [9, 8, 7, 6, 5]]
    runs = [dict(), dict(strategy="early_exit", exit_layer=2),
            dict(strategy="self_speculative", exit_layer=2, num_speculations=3),
            dict(strategy="self_speculative", exit_layer=1, num_speculations=2, temperature=0.9, top_p=0.9, seed=4)]
    for kw in runs:
        for prompt in (PROMPT, prompts):
            args = dict(max_new_tokens=16, stop_token_ids=[], backend="engine", **kw)
            engine.set_cuda_graphs(False)
            eager = layerskip_ext.generate(model, prompt, **args)
            engine.set_cuda_graphs(True)
            graphed = layerskip_ext.generate(model, prompt, **args)
            replays = engine.graph_replays
            again = layerskip_ext.generate(model, prompt, **args)  # replays the graphs captured above
            for a, b, c in zip(*(r if isinstance(r, list) else [r] for r in (eager, graphed, again))):
                assert a.tokens == b.tokens == c.tokens, (kw, len(prompt))
            if device == "cpu":
                assert engine.graph_replays == 0
            else:
                assert engine.graph_replays > replays, "the second call must replay captured graphs"
