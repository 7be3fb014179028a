"""The engine's weight matrices in memory advised for huge pages (csrc/engine/huge_pages.h).

The engine copies its matmul weights, the embedding and the LM head into one mapping advised MADV_HUGEPAGE.
Checked: every matrix is placed (the byte count, computed here from the config, each matrix on its own 4 KiB
page, a tied head counted once), the copies hold the same values (tokens equal the reference's and an engine
built with LAYERSKIP_HUGE_PAGES=0 in a child process), and the mapping outlives the Python model that built it.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext.generation import GenerationArgs
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

PROMPT = [5, 17, 42, 7, 99, 3, 61]
PAGE = 4096


def page_rounded(nbytes: int) -> int:
    return (nbytes + PAGE - 1) // PAGE * PAGE


def expected_bytes(config, weight_dtype: torch.dtype, tied: bool) -> int:
    """Bytes the engine places: each matrix rounded to a page; the float32 embedding, the head in the matmul
    dtype (a tied head shares the embedding's copy when that dtype is float32)."""
    size = torch.tensor([], dtype=weight_dtype).element_size()
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q = config.num_heads * config.head_dim
    KV = config.num_kv_heads * config.head_dim
    layer = sum(page_rounded(n * k * size) for n, k in ((Q + 2 * KV, H), (H, Q), (2 * I, H), (H, I)))
    embed = page_rounded(V * H * 4)
    head = 0 if tied and weight_dtype == torch.float32 else page_rounded(V * H * size)
    return config.num_layers * layer + embed + head


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_every_matrix_is_placed(tmp_path, tied, weight_dtype):
    model = layerskip_ext.load(make_hf_checkpoint(tmp_path, num_hidden_layers=3, hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, vocab_size=300, tie_word_embeddings=tied))
    engine = engine_mod.get_engine(model, weight_dtype)
    assert engine._engine.huge_page_bytes() == expected_bytes(model.config, weight_dtype, tied)
    # the placed copies compute what the reference computes
    ref = layerskip_ext.generate(model, PROMPT, max_new_tokens=12, backend="reference", weight_dtype=weight_dtype)
    eng = layerskip_ext.generate(model, PROMPT, max_new_tokens=12, backend="engine", weight_dtype=weight_dtype)
    assert eng.tokens == ref.tokens


def test_mapping_outlives_the_model(tmp_path):
    model = layerskip_ext.load(make_hf_checkpoint(tmp_path, num_hidden_layers=2, hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, vocab_size=300))
    expected = layerskip_ext.generate(model, PROMPT, max_new_tokens=10).tokens
    engine = engine_mod.get_engine(model)
    del model
    gc.collect()
    args = GenerationArgs(prompt_ids=PROMPT, max_new_tokens=10, strategy="autoregressive", exit_layer=2,
                          num_speculations=0, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_token_ids=(),
                          context_length=256)
    for _ in range(2):  # the engine's matrices still read the mapping after the model and its tensors are gone
        assert engine.generate_batch([args])[0].tokens == expected


CHILD = """
import json, sys, layerskip_ext
from layerskip_ext import engine as engine_mod
model = layerskip_ext.load(sys.argv[1])
result = layerskip_ext.generate(model, {prompt}, max_new_tokens=16, strategy=sys.argv[2], exit_layer=2,
                                num_speculations=3)
print(json.dumps([result.tokens, engine_mod.get_engine(model)._engine.huge_page_bytes()]))
"""


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_switched_off_gives_the_same_tokens(tmp_path, strategy):
    directory = make_hf_checkpoint(tmp_path, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=300)
    runs = {}
    for setting in ("0", "1"):
        env = dict(os.environ, LAYERSKIP_HUGE_PAGES=setting)
        out = subprocess.run([sys.executable, "-c", CHILD.format(prompt=PROMPT), directory, strategy], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["0"][1] == 0 and runs["1"][1] > 0
    assert runs["0"][0] == runs["1"][0]


def test_weight_read_bandwidth(tmp_path):
    """The roofline read of the engine's own weight pages (bench_llamacpp's denominator): a plausible speed,
    and bad repetition counts refused by name."""
    model = layerskip_ext.load(make_hf_checkpoint(tmp_path, num_hidden_layers=2, hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, vocab_size=300))
    engine = engine_mod.get_engine(model)
    bandwidth = engine.weight_read_bandwidth(reps=3)
    assert 0.05 < bandwidth < 10_000  # GB/s: cache-resident here, so well above DRAM speed, but finite
    for reps in (0, -1, 1001):
        with pytest.raises(RuntimeError, match="reps must be in"):
            engine.weight_read_bandwidth(reps=reps)
