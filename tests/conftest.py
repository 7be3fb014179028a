"""Shared fixtures: small random Llama checkpoints written by transformers, and SmolLM2-135M."""
from __future__ import annotations

import pytest
import torch

import layerskip_ext

# Small configs that cover what the loader must handle: GQA / MQA / MHA, tied and untied embeddings,
# head_dim != hidden / heads, llama3 rope scaling, fp32 / bf16 / fp16 files, sharded files.
RANDOM_CONFIGS = {
    "gqa_tied_fp32": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=257, tie_word_embeddings=True),
    "mqa_headdim_llama3_bf16": dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                                    head_dim=32, intermediate_size=96, vocab_size=300, tie_word_embeddings=False,
                                    rope_theta=500000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64},
                                    file_dtype=torch.bfloat16),
    "mha_untied_fp16_sharded": dict(num_hidden_layers=5, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                    intermediate_size=96, vocab_size=211, tie_word_embeddings=False,
                                    file_dtype=torch.float16, max_shard_size="40KB"),
}


def make_hf_checkpoint(directory, seed=0, std=0.08, file_dtype=torch.float32, max_shard_size=None,
                       **config_kwargs):
    """Writes a random transformers LlamaForCausalLM with save_pretrained; returns the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    kwargs.update(config_kwargs)
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so every layer matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            else:
                p.uniform_(0.8, 1.2)
    model = model.to(file_dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **save_kwargs)
    return str(directory)


@pytest.fixture(scope="session", params=sorted(RANDOM_CONFIGS))
def random_checkpoint(request, tmp_path_factory):
    """(name, directory) of a random HF checkpoint."""
    kwargs = dict(RANDOM_CONFIGS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_checkpoint(directory, **kwargs)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (the default model), dequantized to fp32."""
    return layerskip_ext.load(weights="fp32")


@pytest.fixture(scope="session")
def smollm2_packed():
    """SmolLM2-135M-Instruct as the file holds it: Q4_1 blocks (Q8_0 embedding / tied head), memory-mapped."""
    return layerskip_ext.load()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers LlamaForCausalLM holding the same weights as `smollm2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in smollm2.config.to_hf_dict().items() if k != "architectures"})
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(smollm2.module.state_dict())
    return hf.float().eval()

