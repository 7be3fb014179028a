"""The `layerskip-ext` command line (generate / bench / sweep) on the LayerSkip demo checkpoint: what it prints
agrees with `layerskip_ext.generate`, and bad input ends with exit code 2 and a message naming the problem."""
import os
import re

import pytest

import layerskip_ext
from layerskip_ext.cli import main

DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-demo")
PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def demo():
    return layerskip_ext.load(DEMO)


@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", []),
    ("early_exit", ["--exit-layer", "3"]),
    ("self_speculative", ["--exit-layer", "4", "--num-speculations", "3"]),
])
def test_generate_prints_what_the_api_returns(demo, capsys, strategy, extra):
    assert main(["generate", PROMPT, "--model", DEMO, "--strategy", strategy, "--max-new-tokens", "24",
                 "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    kwargs = {"exit_layer": int(extra[1])} if extra else {}
    if strategy == "self_speculative":
        kwargs["num_speculations"] = 3
    expected = layerskip_ext.generate(demo, PROMPT, strategy=strategy, max_new_tokens=24, **kwargs)
    assert out.startswith(PROMPT + expected.text + "\n")
    assert f"strategy {strategy}" in out and f"{expected.stats.new_tokens} new tokens" in out
    assert ("acceptance rate" in out) == (strategy == "self_speculative")


def test_generate_stream_prints_the_same_text(demo, capsys):
    args = ["generate", PROMPT, "--model", DEMO, "--exit-layer", "4", "--max-new-tokens", "20", "--threads", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out.split("\n" + "-" * 60)[0]
    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out.split("\n" + "-" * 60)[0]
    assert streamed == plain


def test_bench_prints_every_strategy(capsys):
    assert main(["bench", "--model", DEMO, "--exit-layer", "4", "--max-new-tokens", "8", "--repeats", "1",
                 "--prompt", PROMPT, "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["strategy", "tokens/s", "ms/token", "speedup", "acceptance"]
    assert [line.split()[0] for line in lines[1:]] == ["autoregressive", "early_exit", "self_speculative"]
    assert lines[1].split()[3] == "1.00x"
    assert re.fullmatch(r"\d+\.\d%", lines[3].split()[4])


def test_bench_without_e_or_d_uses_the_stored_settings(tmp_path, capsys):
    import shutil
    from layerskip_ext.settings import Settings, save_settings
    model_dir = str(tmp_path / "demo")
    shutil.copytree(DEMO, model_dir)
    save_settings(model_dir, Settings(exit_layer=3, num_speculations=3), num_layers=layerskip_ext.load(DEMO).num_layers)
    assert main(["bench", "--model", model_dir, "--max-new-tokens", "12", "--repeats", "1", "--prompt", PROMPT,
                 "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["autoregressive", "early_exit", "self_speculative"]
    assert lines[4] == ("(early exit at layer 3; self-speculative at the settings stored with the model: E=3 d=3 "
                        "threshold=0.0 adaptive=False K=all)")
    model = layerskip_ext.load(model_dir)
    want = layerskip_ext.generate(model, PROMPT, max_new_tokens=12, stop_token_ids=[], strategy="self_speculative",
                                  exit_layer=3, num_speculations=3).stats.acceptance_rate
    assert lines[3].split()[4] == f"{want:.1%}"  # stored E=3, d=3, not E=L/4=2, d=4


def test_sweep_prints_the_grid_with_acceptance_of_the_api(demo, capsys):
    assert main(["sweep", "--model", DEMO, "--exit-layers", "2,6", "--num-speculations", "1,3",
                 "--max-new-tokens", "16", "--prompt", PROMPT, "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("autoregressive:")
    rows = [line.split() for line in lines[2:]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(2, 1), (2, 3), (6, 1), (6, 3)]
    for E, d, _, _, acceptance in rows:
        r = layerskip_ext.generate(demo, PROMPT, strategy="self_speculative", exit_layer=int(E),
                                   num_speculations=int(d), max_new_tokens=16, stop_token_ids=[])
        assert acceptance == f"{r.stats.acceptance_rate:.1%}"


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--model", DEMO, "--exit-layer", "9"], "exit_layer"),
    (["generate", "x", "--model", DEMO, "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "x", "--model", DEMO, "--temperature", "-1"], "temperature"),
    (["generate", "x", "--model", "/no/such/model"], "/no/such/model"),
    (["sweep", "--model", DEMO, "--exit-layers", "2", "--num-speculations", "0"], "num_speculations"),
    (["sweep", "--model", DEMO, "--repeats", "0"], "repeats"),
    (["bench", "--model", DEMO, "--repeats", "0"], "repeats"),
])
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerskip-ext: error:") and message in err
