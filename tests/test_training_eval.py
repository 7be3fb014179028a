"""Per-exit evaluation: loss / accuracy against a hand computation, acceptance rate on a model built to accept."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import layerskip_ext
from layerskip_ext.config import ModelConfig
from layerskip_ext.model import LayerSkipModel
from layerskip_ext.reference import ReferenceLlama
from layerskip_ext.training.evaluate import acceptance_rates, exit_metrics, write_report


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                      vocab_size=30, tie_word_embeddings=True, max_position_embeddings=128)
    lm = ReferenceLlama(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(3)  # sharper logits, so that the exits disagree
    return lm


def test_exit_metrics_hand_computed():
    lm = _model()
    inputs, labels = torch.randint(0, 30, (3, 10)), torch.randint(0, 30, (3, 10))
    labels[1, :5] = -100
    rows = exit_metrics(lm, inputs, labels, batch_size=2)
    assert [r["exit"] for r in rows] == [1, 2, 3, 4]
    keep = labels != -100
    with torch.no_grad():
        for r in rows:
            logits = lm(inputs, exit_layer=r["exit"])  # [3, 10, V]
            assert r["loss"] == pytest.approx(float(F.cross_entropy(logits[keep], labels[keep])), rel=1e-5)
            assert r["accuracy"] == pytest.approx(float((logits.argmax(-1)[keep] == labels[keep]).float().mean()))


def test_trainer_validation_is_the_same_per_exit_cross_entropy():
    from layerskip_ext.training.trainer import validate
    lm = _model().train()
    inputs, labels = torch.randint(0, 30, (5, 8)), torch.randint(0, 30, (5, 8))
    val = validate(lm, inputs, labels, batch_size=2)
    assert lm.training  # handed back in training mode
    with torch.no_grad():
        for e in (1, 2, 3, 4):
            logits = lm.eval()(inputs, exit_layer=e)  # [5, 8, V]
            assert val[e] == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), labels.flatten())), rel=1e-5)
    with pytest.raises(ValueError, match="no position to predict"):
        exit_metrics(lm, inputs, torch.full_like(labels, -100))


def test_acceptance_rate_is_one_where_the_remaining_layers_do_nothing():
    lm = _model()
    with torch.no_grad():  # layers 2 and 3 (0-based) add nothing to the residual: exit 2 == the full model
        for l in (2, 3):
            lm.model.layers[l].self_attn.o_proj.weight.zero_()
            lm.model.layers[l].mlp.down_proj.weight.zero_()
    model = LayerSkipModel(lm.config, lm, tokenizer=None)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    rates = acceptance_rates(model, prompts, exits=[1, 2, 3, 4], num_speculations=3, max_new_tokens=12,
                             backend="reference")
    assert set(rates) == {1, 2, 3}  # the last layer is not a draft exit
    assert rates[2] == 1.0 and rates[3] == 1.0
    assert rates[1] < 1.0
    if layerskip_ext.engine.is_available():  # the default backend: the C++ engine counts the same
        assert acceptance_rates(model, prompts, exits=[1, 2, 3, 4], num_speculations=3, max_new_tokens=12) == rates


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"plain": [{"exit": 1, "loss": 5.0, "accuracy": 0.1, "acceptance_rate": 0.05},
                         {"exit": 2, "loss": 3.0, "accuracy": 0.4, "acceptance_rate": None}],
               "layerskip": [{"exit": 1, "loss": 4.0, "accuracy": 0.3, "acceptance_rate": 0.5},
                             {"exit": 2, "loss": 3.1, "accuracy": 0.39, "acceptance_rate": None}]}
    table = write_report(results, str(tmp_path))
    want = ("| exit | plain loss | plain acc | plain accept | layerskip loss | layerskip acc | layerskip accept |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n"
            "| 1 | 5.000 | 10.0% | 5.0% | 4.000 | 30.0% | 50.0% |\n"
            "| 2 | 3.000 | 40.0% | - | 3.100 | 39.0% | - |\n")
    assert table == want
    assert (tmp_path / "table.md").read_text() == want
    with open(tmp_path / "per_layer.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == results
