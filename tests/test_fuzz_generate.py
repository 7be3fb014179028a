"""Property-based fuzzing of generation (hypothesis): random small Llama configs (GQA / MQA / MHA, tied or
untied head, llama3 rope scaling or none), random prompts, strategies and sampling parameters. The C++
engine must give the reference backend's tokens; random invalid arguments must raise LayerSkipError and
leave the model giving the same tokens as before.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerskip_ext
from layerskip_ext import LayerSkipError, ModelConfig
from layerskip_ext.engine import is_available
from layerskip_ext.model import LayerSkipModel
from layerskip_ext.reference import ReferenceLlama

pytestmark = pytest.mark.skipif(not is_available(), reason="the C++ extension is not built")
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 3]))  # MHA, GQA, MQA
    head_dim = draw(st.sampled_from([8, 16, 32]))
    scaling = draw(st.sampled_from([None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}]))
    return ModelConfig(num_layers=draw(st.integers(2, 5)), hidden_size=draw(st.sampled_from([16, 32, 48])),
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       intermediate_size=draw(st.sampled_from([32, 64])), vocab_size=draw(st.integers(8, 80)),
                       rope_theta=draw(st.sampled_from([10000.0, 500000.0])), rope_scaling=scaling,
                       rms_norm_eps=1e-5, tie_word_embeddings=draw(st.booleans()), max_position_embeddings=96)


def random_model(config: ModelConfig, seed: int) -> LayerSkipModel:
    """Weights large enough that every layer matters and logits are well separated (no argmax near-ties)."""
    torch.manual_seed(seed)
    module = ReferenceLlama(config)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 / math.sqrt(p.shape[1]) * 4)
            else:
                p.uniform_(0.8, 1.2)
    return LayerSkipModel(config, module.eval())


@st.composite
def generation_kwargs(draw, num_layers: int, vocab: int):
    strategy = draw(st.sampled_from(["autoregressive", "early_exit", "self_speculative"]))
    kwargs = dict(strategy=strategy, max_new_tokens=draw(st.integers(0, 24)))
    if strategy == "early_exit":
        kwargs["exit_layer"] = draw(st.integers(1, num_layers))
    if strategy == "self_speculative":
        kwargs["exit_layer"] = draw(st.integers(1, num_layers - 1))
        kwargs["num_speculations"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        kwargs.update(temperature=draw(st.sampled_from([0.5, 1.0, 1.7])), top_k=draw(st.sampled_from([0, 1, 5])),
                      top_p=draw(st.sampled_from([1.0, 0.9, 0.5])), seed=draw(st.integers(0, 2**64 - 1)))
    kwargs["stop_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), max_size=2))
    return kwargs


@SETTINGS
@given(data=st.data(), config=configs(), seed=st.integers(0, 1000))
def test_engine_equals_reference_on_random_models(data, config, seed):
    model = random_model(config, seed)
    prompt = data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=1, max_size=20), label="prompt")
    kwargs = data.draw(generation_kwargs(config.num_layers, config.vocab_size), label="kwargs")
    ref = layerskip_ext.generate(model, prompt, backend="reference", **kwargs)
    eng = layerskip_ext.generate(model, prompt, backend="engine", **kwargs)
    assert eng.tokens == ref.tokens
    assert eng.finish_reason == ref.finish_reason


# invalid values for each argument: wrong types, out of range, bools for numbers
INVALID = {
    "max_new_tokens": [-1, 2.0, "3", None, True, [1]],
    "strategy": ["beam", None, 3],
    "exit_layer": [0, -1, 99, 1.5, True, "1"],
    "num_speculations": [0, -3, 2.5, True],
    "temperature": [-0.5, float("nan"), float("inf"), 1e-9, 1e9, "hot", True, None],
    "top_k": [-1, 1.5, True, "5", None],
    "top_p": [0.0, -0.1, 1.01, float("nan"), True, "1"],
    "seed": [1.5, "s", True, [1]],
    "stop_token_ids": [[-1], [10**6], [1.0], "ab", 5],
    "context_length": [0, -5, 10**9, 2.0, True],
    "backend": ["gpu", None],
}


@pytest.fixture(scope="module")
def fixed_model():
    config = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                         vocab_size=40, max_position_embeddings=64)
    return random_model(config, 0)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(INVALID)), data=st.data(), backend=st.sampled_from(["reference", "engine"]))
def test_invalid_arguments_raise_layerskip_error_and_leave_the_model_usable(fixed_model, name, data, backend):
    value = data.draw(st.sampled_from(INVALID[name]), label="value")
    good = dict(max_new_tokens=8, strategy="self_speculative", exit_layer=2, num_speculations=3, temperature=0.9,
                seed=11, stop_token_ids=[], backend=backend)
    before = layerskip_ext.generate(fixed_model, [1, 2, 3], **good)
    with pytest.raises(LayerSkipError):
        layerskip_ext.generate(fixed_model, [1, 2, 3], **dict(good, **{name: value}))
    assert layerskip_ext.generate(fixed_model, [1, 2, 3], **good).tokens == before.tokens
