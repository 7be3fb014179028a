"""Tuned settings stored with a model (settings.py) and `layerskip-ext tune` (tune.py).

The settings file round-trips through load(); generate() uses it when the caller gives no exit_layer /
num_speculations; corrupt or mismatched files are rejected naming the file and the field; the tuner writes a
CSV, a PNG and the best row of its CSV as the settings.
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

import layerskip_ext
from layerskip_ext import settings as st
from layerskip_ext.cli import main as cli_main
from conftest import make_hf_checkpoint

PROMPT = [5, 17, 30, 7, 9, 3, 21]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 4-layer checkpoint (vocabulary 32) without settings."""
    directory = tmp_path_factory.mktemp("settings_model")
    return make_hf_checkpoint(directory, seed=5, std=0.25, num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, vocab_size=32, tie_word_embeddings=True)


@pytest.fixture()
def model_dir(checkpoint, tmp_path):
    """A fresh copy of the checkpoint per test (tests write settings into it)."""
    directory = tmp_path / "model"
    shutil.copytree(checkpoint, directory)
    return str(directory)


def test_round_trip_and_generate_uses_settings(model_dir):
    assert layerskip_ext.load(model_dir).settings is None
    stored = st.Settings(exit_layer=3, num_speculations=5, draft_threshold=0.25, adaptive=True,
                         measured={"speedup": 1.5})
    path = st.save_settings(model_dir, stored, num_layers=4)
    assert path == os.path.join(model_dir, "layerskip_settings.json")
    model = layerskip_ext.load(model_dir)
    assert model.settings == stored
    common = dict(max_new_tokens=12, stop_token_ids=[], backend="reference")
    r = layerskip_ext.generate(model, PROMPT, strategy="self_speculative", **common)
    assert (r.stats.exit_layer, r.stats.num_speculations) == (3, 5)
    explicit = layerskip_ext.generate(model, PROMPT, strategy="self_speculative", exit_layer=3, num_speculations=5,
                                      draft_threshold=0.25, adaptive=True, **common)
    assert (r.tokens, r.stats.drafted, r.stats.accepted) == \
        (explicit.tokens, explicit.stats.drafted, explicit.stats.accepted)
    # the caller's E / d win over the stored ones
    mine = layerskip_ext.generate(model, PROMPT, strategy="self_speculative", exit_layer=1, num_speculations=2,
                                  **common)
    assert (mine.stats.exit_layer, mine.stats.num_speculations) == (1, 2)


def test_gguf_sidecar_path(tmp_path):
    gguf = str(tmp_path / "m.gguf")
    assert st.settings_path(gguf) == gguf + ".layerskip_settings.json"
    assert st.load_settings(gguf, 4) is None
    st.save_settings(gguf, st.Settings(2, 3), num_layers=4)
    assert st.load_settings(gguf, 4) == st.Settings(2, 3)


GOOD = dict(format="layerskip_settings", version=1, num_layers=4, exit_layer=2, num_speculations=3,
            draft_threshold=0.2, adaptive=False)


@pytest.mark.parametrize("change,field", [
    (dict(exit_layer=4), "exit_layer"), (dict(exit_layer=0), "exit_layer"), (dict(exit_layer="2"), "exit_layer"),
    (dict(exit_layer=True), "exit_layer"), (dict(num_layers=8), "num_layers"),
    (dict(num_speculations=0), "num_speculations"), (dict(num_speculations=2.0), "num_speculations"),
    (dict(draft_threshold=1.5), "draft_threshold"), (dict(draft_threshold="x"), "draft_threshold"),
    (dict(adaptive="yes"), "adaptive"), (dict(format="other"), "format"), (dict(version=2), "version"),
    (dict(measured=[1]), "measured"), (dict(exit_layer=None), "exit_layer"),
    (dict(draft_treshold=0.9), "draft_treshold")])  # a misspelled field was ignored
def test_mismatched_settings_rejected(model_dir, change, field):
    raw = dict(GOOD, **change)
    path = os.path.join(model_dir, "layerskip_settings.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=f"layerskip_settings.json: field '{field}'"):
        layerskip_ext.load(model_dir)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe", "[" * 100000])
def test_corrupt_settings_rejected(model_dir, text):
    path = os.path.join(model_dir, "layerskip_settings.json")
    with open(path, "w", encoding="latin-1") as f:
        f.write(text)
    with pytest.raises(ValueError, match="layerskip_settings.json"):
        layerskip_ext.load(model_dir)


def test_save_checks_before_writing(model_dir):
    with pytest.raises(ValueError, match="exit_layer"):
        st.save_settings(model_dir, st.Settings(exit_layer=9, num_speculations=2), num_layers=4)
    assert not os.path.exists(os.path.join(model_dir, "layerskip_settings.json"))


def test_tune_writes_csv_plot_and_best_settings(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nworld\n")  # the random checkpoint has no tokenizer: token-id prompts below
    out = tmp_path / "out"
    # text prompts and a model without a tokenizer: a clear error, exit status 2
    assert cli_main(["tune", "--model", model_dir, "--prompts", str(prompts), "--out", str(out),
                     "--backend", "reference"]) == 2
    from layerskip_ext.tune import tune
    model = layerskip_ext.load(model_dir)
    best, stored = tune(model, [PROMPT, PROMPT[:4]], str(out), [1, 2], [1, 3], [0.0, 0.3], [False, True],
                        max_new_tokens=6, backend="reference", log=lambda *a: None)
    with open(out / "tune.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2
    top = max(rows, key=lambda r: float(r["speedup"]))
    assert (best.exit_layer, best.num_speculations) == (int(top["exit_layer"]), int(top["num_speculations"]))
    assert os.path.getsize(out / "tune.png") > 1000
    loaded = layerskip_ext.load(model_dir).settings
    assert stored == os.path.join(model_dir, "layerskip_settings.json")
    assert (loaded.exit_layer, loaded.num_speculations, loaded.draft_threshold, loaded.adaptive) == \
        (best.exit_layer, best.num_speculations, best.draft_threshold, best.adaptive)
    assert loaded.measured["speedup"] == round(best.speedup, 4)


def test_tune_cli_errors(model_dir):
    assert cli_main(["tune", "--model", model_dir, "--exit-layers", "9", "--backend", "reference"]) == 2
    assert cli_main(["tune", "--model", model_dir, "--num-speculations", "a,b", "--backend", "reference"]) == 2


def test_tune_pairs_each_prompt_with_autoregressive_runs(monkeypatch):
    """The speed-up is the median of per-prompt ratios of runs made back to back, in alternating order: a machine
    whose speed halves over the sweep (a drifting load) does not change it."""
    from layerskip_ext import tune as tune_mod
    calls = []

    def fake_rate(model, prompt, **kwargs):
        kind = kwargs.get("strategy", "autoregressive")
        calls.append((prompt[0], kind))
        slow = 0.5 ** (len(calls) / 40)  # the machine slows down steadily
        return (150.0 if kind == "self_speculative" else 100.0) * slow, 10, 7

    monkeypatch.setattr(tune_mod, "_decode_rate", fake_rate)
    speedup, ss, ar, acc = tune_mod._paired(None, [[1], [2], [3]], 2, {}, dict(strategy="self_speculative"))
    assert len(calls) == 12 and acc == 0.7
    firsts = [calls[i][1] for i in range(0, 12, 2)]  # who goes first alternates per pair
    assert firsts == ["autoregressive", "self_speculative"] * 3
    assert [calls[i][0] for i in range(0, 12, 2)] == [1, 2, 3, 1, 2, 3]
    assert speedup == pytest.approx(1.5, rel=0.02)  # drift between two adjacent runs only
    assert ss > ar
