"""The command line on bad input: one line on stderr, exit status 2, no traceback, whatever the error's type
(bad arguments, bad files, a garbage tokenizer, a broken config), and no flag silently replaced by a default."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from layerskip_ext.cli import main

DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-demo")


def broken_copy(tmp_path, name, content):
    d = tmp_path / "m"
    shutil.copytree(DEMO, d)
    (d / name).write_text(content)
    return str(d)


@pytest.mark.parametrize("argv_fn,message", [
    (lambda t: ["bench", "--model", DEMO, "--exit-layer", "0", "--repeats", "1", "--max-new-tokens", "2"],
     "exit_layer"),
    (lambda t: ["generate", "x", "--model", broken_copy(t, "tokenizer.json", "garbage")], "tokenizer.json"),
    (lambda t: ["generate", "x", "--model", broken_copy(t, "config.json", "[1, 2]")], "config.json"),
    (lambda t: ["generate", "x", "--model", broken_copy(t, "config.json", "[" * 100000)], "config.json"),
    (lambda t: ["generate", "x", "--model", broken_copy(t, "config.json", json.dumps(
        dict(json.load(open(os.path.join(DEMO, "config.json"))), num_hidden_layers="8")))], "num_hidden_layers"),
    (lambda t: ["generate", "x", "--model", DEMO, "--temperature", "1e-300"], "temperature"),
    (lambda t: ["generate", "x", "--model", DEMO, "--max-new-tokens", str(2**64)], None),
    (lambda t: ["sweep", "--model", DEMO, "--exit-layers", "2,x"], "--exit-layers"),
    (lambda t: ["generate", "x", "--model", str(t)], "config.json"),
    # found by the hostile-input audit: a crash in torch (100000), a ZeroDivisionError traceback (0, 1 tokens)
    (lambda t: ["generate", "x", "--model", DEMO, "--threads", "100000"], "--threads"),
    (lambda t: ["generate", "x", "--model", DEMO, "--threads", "0"], "--threads"),
    (lambda t: ["bench", "--model", DEMO, "--max-new-tokens", "1", "--repeats", "1"], "--max-new-tokens"),
    (lambda t: ["sweep", "--model", DEMO, "--max-new-tokens", "0", "--exit-layers", "2", "--num-speculations", "2"],
     "--max-new-tokens"),
    (lambda t: ["tune", "--model", DEMO, "--num-prompts", "0", "--no-save"], "--num-prompts"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv_fn, message):
    code = main(argv_fn(tmp_path))
    err = capsys.readouterr().err
    if message is None:  # a huge --max-new-tokens is valid: it runs to the context
        assert code == 0, err
        return
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerskip-ext: error: ") and message in lines[0], err


def test_no_traceback_from_the_console_entry_point(tmp_path):
    bad = broken_copy(tmp_path, "tokenizer.json", "garbage")
    out = subprocess.run([sys.executable, "-m", "layerskip_ext.cli", "generate", "x", "--model", bad],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
