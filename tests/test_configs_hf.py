"""Model configurations beyond conftest's three, against transformers' LlamaForCausalLM as the oracle.

Each config is a tiny random model written by transformers (save_pretrained) and loaded by us. For each:
the reference module's logits equal transformers' at every position; the engine's greedy tokens equal
transformers' greedy `generate`; the engine's first sampled token for 40 seeds is the one that the inverse
CDF of transformers' own softmax picks for that seed's uniform draw (so the engine's logits match too, not
just their argmax); self-speculative greedy equals autoregressive greedy on both backends.
Configs we cannot run exactly (another activation, biases, unsupported RoPE scalings) must fail at load with
an error naming the field, never load and compute something else.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import CheckpointError
from layerskip_ext import engine as engine_mod
from layerskip_ext.sampling import sample_from_probs
from conftest import make_hf_checkpoint

BASE = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=257, tie_word_embeddings=False, max_position_embeddings=128)

# what conftest.RANDOM_CONFIGS already covers (GQA 2, MQA with head_dim != hidden / heads, MHA, llama3 RoPE,
# tied / untied, fp32 / bf16 / fp16 files, shards) is not repeated here
CONFIGS = {
    "gqa3_hidden72": dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2),
    "gqa4_headdim24": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24),
    "mqa_hidden100_heads5": dict(hidden_size=100, num_attention_heads=5, num_key_value_heads=1),
    "hidden36_inter52": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1, intermediate_size=52),
    "intermediate37_fp16": dict(intermediate_size=37, file_dtype=torch.float16),
    "vocab1000_theta100": dict(vocab_size=1000, rope_theta=100.0),
    "vocab50257_bf16": dict(vocab_size=50257, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=40, file_dtype=torch.bfloat16),
    "theta1e7_tied": dict(rope_theta=1e7, tie_word_embeddings=True),
    "max_positions_24": dict(max_position_embeddings=24),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_linear_old_key": dict(rope_scaling={"type": "linear", "factor": 2.5}),
    "rope_dynamic_24_positions": dict(max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    "rope_llama3_gqa4": dict(num_attention_heads=8, num_key_value_heads=2,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, our model, transformers model) for one config."""
    from transformers import LlamaForCausalLM
    kwargs = dict(BASE, **CONFIGS[request.param])
    directory = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), **kwargs)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return request.param, layerskip_ext.load(directory), hf


def prompt_for(model, n=11, seed=1):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_reference_logits_match_transformers(pair):
    name, ours, hf = pair
    ids = torch.tensor([prompt_for(ours, n=min(20, ours.config.max_position_embeddings))])
    torch.testing.assert_close(ours.module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
@torch.no_grad()
def test_greedy_tokens_match_transformers_and_self_speculative_is_lossless(pair):
    name, ours, hf = pair
    prompt = prompt_for(ours)
    n = min(16, ours.config.max_position_embeddings - len(prompt))
    ids = torch.tensor([prompt])  # with its mask: without one, transformers masks every prompt token equal to pad
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    L = ours.num_layers
    for backend in ("reference", "engine"):
        ar = layerskip_ext.generate(ours, prompt, max_new_tokens=n, stop_token_ids=[], backend=backend)
        assert ar.tokens == expected, f"{name} {backend}"
        for E, d in ((1, 3), (L - 1, 2)):
            spec = layerskip_ext.generate(ours, prompt, max_new_tokens=n, stop_token_ids=[], backend=backend,
                                          strategy="self_speculative", exit_layer=E, num_speculations=d)
            assert spec.tokens == expected, f"{name} {backend} E={E} d={d}"


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
@torch.no_grad()
def test_engine_sampled_first_token_follows_transformers_probabilities(pair):
    """The first new token is drawn with counter 0 of the seed (sampling.py): the engine must pick what the
    inverse CDF of transformers' softmax (temperature 1, then top-k 20) picks for that draw."""
    name, ours, hf = pair
    prompt = prompt_for(ours, seed=2)
    logits = hf(torch.tensor([prompt])).logits[0, -1:]  # [1, V]
    for top_k in (0, 20):
        probs = torch.softmax(logits.double(), -1)
        if top_k:
            cut = probs.topk(top_k).values[0, -1]
            probs = torch.where(probs >= cut, probs, torch.zeros_like(probs))
        for seed in range(20):
            expected = int(sample_from_probs(probs / probs.sum(), seed, 0)[0])
            got = layerskip_ext.generate(ours, prompt, max_new_tokens=1, temperature=1.0, top_k=top_k, seed=seed,
                                         stop_token_ids=[], backend="engine").tokens
            assert got == [expected], f"{name} top_k={top_k} seed={seed}"


# ---------------------------------------------------------------------------------------------------
# configs that must be refused at load, naming the field


@pytest.mark.parametrize("edit,field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "rope_scaling"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8,
                        "long_factor": [1.0] * 8, "original_max_position_embeddings": 32}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": float("nan")}), "rope_scaling.factor"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),  # top level: transformers moves it into RoPE
])
def test_unsupported_configs_are_refused_at_load(tmp_path, edit, field):
    directory = make_hf_checkpoint(tmp_path / "m", **dict(BASE, num_hidden_layers=2, hidden_size=32,
                                                          intermediate_size=48, vocab_size=64))
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("rope_parameters", None)  # transformers 5 writes the RoPE settings here; tested both ways below
    config.update(edit)
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError) as info:
        layerskip_ext.load(directory)
    assert info.value.field == field, str(info.value)
    assert field.split(".")[0] in str(info.value)
    if "rope_scaling" in edit:  # the same settings nested in transformers 5's rope_parameters
        config.pop("rope_scaling")
        config["rope_parameters"] = dict(edit["rope_scaling"], rope_theta=10000.0)
        with open(config_path, "w") as f:
            json.dump(config, f)
        with pytest.raises(CheckpointError, match="rope"):
            layerskip_ext.load(directory)


@torch.no_grad()
@pytest.mark.parametrize("same", [False, True])
def test_tied_config_with_its_own_lm_head_tensor_follows_transformers(tmp_path, same):
    """tie_word_embeddings true, but the file also holds an lm_head.weight: transformers uses that head when it
    differs from the embedding (and warns); we ignored it and ran the embedding as the head (logits off by
    ~10). An identical copy stays tied."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    directory = make_hf_checkpoint(tmp_path / "m", **dict(BASE, tie_word_embeddings=True))
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed.clone() if same else torch.randn_like(embed) * 0.1
    save_file(state, path, metadata={"format": "pt"})
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with pytest.warns(UserWarning, match="lm_head.weight") if not same else contextlib.nullcontext():
        ours = layerskip_ext.load(directory)
    assert ours.config.tie_word_embeddings == same
    ids = torch.tensor([prompt_for(ours)])
    torch.testing.assert_close(ours.module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    if engine_mod.is_available():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert layerskip_ext.generate(ours, ids[0].tolist(), max_new_tokens=8, stop_token_ids=[],
                                      backend="engine").tokens == expected[0, ids.shape[1]:].tolist()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("where", ["missing", "top_level"])
@torch.no_grad()
def test_llama3_original_context_as_transformers(tmp_path, where):
    """llama3 RoPE's original_max_position_embeddings, read as transformers 5 reads config.json: missing from the
    scaling, it is max_position_embeddings (we used 8192); a top-level key wins over the scaling's own (we
    ignored it). Found by an audit: logits off by 6-35% relative, greedy tokens different."""
    from transformers import LlamaForCausalLM
    directory = make_hf_checkpoint(tmp_path / "m", **dict(BASE, rope_scaling=dict(LLAMA3)))
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            if where == "missing":
                config[key].pop("original_max_position_embeddings", None)
    if where == "top_level":
        config["original_max_position_embeddings"] = 64
    with open(config_path, "w") as f:
        json.dump(config, f)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = layerskip_ext.load(directory)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == \
        hf.config.rope_parameters["original_max_position_embeddings"] == (128 if where == "missing" else 64)
    ids = torch.tensor([prompt_for(ours, n=100)])
    torch.testing.assert_close(ours.module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
