"""benchmarks/eval_heldout.py on a tiny random model (reference backend): prompts from the held-out stream, the
sweep's acceptance against training.evaluate.acceptance_rates, the lossless check, and the written plot."""
import os
import sys

import pytest
import torch

from layerskip_ext.config import ModelConfig
from layerskip_ext.model import LayerSkipModel
from layerskip_ext.reference import ReferenceLlama
from layerskip_ext.training.evaluate import acceptance_rates

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import eval_heldout  # noqa: E402


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                      vocab_size=40, tie_word_embeddings=True, max_position_embeddings=128)
    lm = ReferenceLlama(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(3)  # sharper logits: the exits disagree now and then
    return LayerSkipModel(cfg, lm, tokenizer=None)


def test_prompts_are_spread_over_the_stream():
    tokens = torch.arange(100)
    assert eval_heldout.held_out_prompts(tokens, 4, 10) == [list(range(s, s + 10)) for s in (0, 22, 44, 66)]
    with pytest.raises(ValueError, match="too few"):
        eval_heldout.held_out_prompts(torch.arange(12), 4, 10)


def test_distinct_ngrams_hand_computed():
    assert eval_heldout.distinct_ngrams([1, 2, 3, 4, 5], 2) == 1.0
    assert eval_heldout.distinct_ngrams([7, 8, 7, 8, 7, 8], 2) == 2 / 5  # (7,8) (8,7) (7,8) (8,7) (7,8)
    assert eval_heldout.distinct_ngrams([1], 4) == 1.0


def test_sweep_acceptance_matches_the_evaluation_code(tmp_path):
    pytest.importorskip("matplotlib")
    model = _model()
    prompts = eval_heldout.held_out_prompts(torch.randint(0, 40, (200,)), 3, 6)
    settings = [(E, d) for E in (1, 2) for d in (1, 3)]
    ar, rows, tuned = eval_heldout.sweep(model, prompts, settings, 12, None, "reference")
    assert tuned is None
    assert ar["strategy"] == "autoregressive" and ar["acceptance"] is None and 0 < ar["distinct_4grams"] <= 1
    assert [(r["exit_layer"], r["num_speculations"]) for r in rows] == settings
    for d in (1, 3):
        want = acceptance_rates(model, prompts, [1, 2], num_speculations=d, max_new_tokens=12, backend="reference")
        for r in rows:
            if r["num_speculations"] == d:
                assert r["acceptance"] == want[r["exit_layer"]]
    assert 0 < min(r["acceptance"] for r in rows) < 1  # the model is one that disagrees: a real test
    eval_heldout.contour("tiny", rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_tuned_settings_row_is_the_stored_settings(tmp_path):
    from layerskip_ext.settings import Settings
    model = _model()
    prompts = eval_heldout.held_out_prompts(torch.randint(0, 40, (200,)), 3, 6)
    with pytest.raises(ValueError, match="no tuned settings"):
        eval_heldout.sweep(model, prompts, [(1, 2)], 12, None, "reference", tuned=True)
    model.settings = Settings(exit_layer=2, num_speculations=3)  # threshold 0, not adaptive: the grid's (2, 3)
    ar, rows, tuned = eval_heldout.sweep(model, prompts, [(1, 2), (2, 3)], 12, None, "reference", tuned=True)
    assert [(r["exit_layer"], r["num_speculations"]) for r in rows] == [(1, 2), (2, 3)]
    assert (tuned["exit_layer"], tuned["num_speculations"], tuned["adaptive"]) == (2, 3, False)
    assert tuned["acceptance"] == rows[1]["acceptance"] != rows[0]["acceptance"]
    assert tuned["tokens_per_round"] == rows[1]["tokens_per_round"]
    text = eval_heldout.sweep_markdown("tiny", ar, rows, tuned)
    assert "tuned settings (stored with the model): E=2 d=3 threshold=0.0 adaptive=False K=all" in text
    eval_heldout.write_csv(str(tmp_path / "s.csv"), [ar] + rows + [dict(tuned, strategy="tuned")])
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].endswith(",draft_threshold,adaptive,draft_vocab_size")
    assert lines[1].endswith(",,,") and lines[4].startswith("tuned,2,3,")


def test_shipped_code16_checkpoint_is_lossless_at_its_tuned_settings():
    import layerskip_ext
    path = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-code16")
    model = layerskip_ext.load(path)
    assert model.num_layers == 16 and model.config.vocab_size == 2048
    assert model.settings is not None and 1 <= model.settings.exit_layer < 16  # layerskip_settings.json
    prompt = "    def __init__(self, name):\n        self.name = name\n"
    ar = layerskip_ext.generate(model, prompt, max_new_tokens=24, stop_token_ids=[], backend="reference")
    for backend in ("reference", "engine") if layerskip_ext.engine.is_available() else ("reference",):
        spec = layerskip_ext.generate(model, prompt, max_new_tokens=24, stop_token_ids=[], backend=backend,
                                      strategy="self_speculative")  # E, d, threshold, adaptive, K: the stored ones
        assert spec.tokens == ar.tokens and spec.stats.drafted > 0, backend
