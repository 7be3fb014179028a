"""Training survives faults: a run SIGKILLed at a random step resumes to bitwise the same weights as an
uninterrupted run; a checkpoint left half-written by a kill is never resumed from; a checkpoint cannot run code."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from layerskip_ext.training.config import load_config
from layerskip_ext.training.trainer import train
from test_training_recipes import tiny_overrides

STEPS = 8


def _overrides(tmp_path, out, extra=(), steps=STEPS, save_every=1):
    # layer dropout and the gradual exit curriculum on, so the resumed run must redo both draws exactly;
    return tiny_overrides(tmp_path, out=out, steps=steps, kind="reference",  # no transformers import: quick
                          extra=[f"train.save_every={save_every}", "train.keep_checkpoints=2", "train.grad_accum=2",
                                 'early_exit.curriculum="gradual"', 'layer_dropout.time_schedule="exp"', *extra])


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log_steps(path) -> list[int]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


@pytest.mark.slow  # a second Python process (its imports take most of the time)
def test_sigkill_at_a_random_step_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    # 24 short steps, a checkpoint every 3: the kill lands anywhere, often steps after the last checkpoint
    cfg = dict(steps=24, save_every=3, extra=["train.eval_every=8"])
    whole = train(load_config(None, _overrides(tmp_path, "whole", **cfg)), progress=False)
    want = load_file(os.path.join(whole["final_dir"], "model.safetensors"))
    kill_after = random.randint(1, 10)  # the step whose log record triggers the kill
    cfg["extra"] = cfg["extra"] + ['tokenizer.path=' + json.dumps(str(tmp_path / "whole" / "tokenizer.json"))]
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(load_config(None, _overrides(tmp_path, "killed", **cfg)).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "layerskip_ext.training", "train", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    try:
        while not any(s >= kill_after for s in _log_steps(log)):
            assert proc.poll() is None, "the training process ended before it was killed"
            assert time.time() < deadline, "the training process made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.isdir(tmp_path / "killed" / "final"), f"killed after step {kill_after}: too late to test"
    resumed = train(load_config(None, _overrides(tmp_path, "killed", **cfg)), progress=False)
    _assert_same_weights(load_file(os.path.join(resumed["final_dir"], "model.safetensors")), want)
    assert _log_steps(log) == list(range(1, 25)), f"killed after step {kill_after}"


def test_a_half_written_checkpoint_is_not_resumed_from(tmp_path):
    whole = train(load_config(None, _overrides(tmp_path, "run")), progress=False)
    want = {k: v.clone() for k, v in whole["model"].state_dict().items()}
    run = tmp_path / "run"
    # a kill while step 8 was being saved: the export and the last checkpoint are gone, step 8 is a .tmp folder
    for d in (run / "final", run / "checkpoints" / f"step_{STEPS:07d}"):
        for f in os.listdir(d):
            os.remove(d / f)
        os.rmdir(d)
    partial = run / "checkpoints" / f"step_{STEPS:07d}.tmp"
    partial.mkdir()
    (partial / "trainer_state.pt").write_bytes(b"truncated")
    resumed = train(load_config(None, _overrides(tmp_path, "run")), progress=False)
    _assert_same_weights(resumed["model"].state_dict(), want)
    assert sorted(os.listdir(run / "checkpoints")) == [f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(load_config(None, _overrides(tmp_path, "run")), progress=False)
    state_file = tmp_path / "run" / "checkpoints" / f"step_{STEPS:07d}" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["evil"] = _RunsCode()
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="trainer_state.pt.*refusing"):
        train(load_config(None, _overrides(tmp_path, "run")), progress=False)
    assert not os.path.exists(tmp_path / "pwned")


def test_resume_past_the_steps_or_into_another_architecture_is_refused(tmp_path):
    """A resume whose latest checkpoint is past train.steps wrote a checkpoint labelled with the smaller step; one
    into a changed architecture raised a bare size-mismatch RuntimeError. Both are errors naming the checkpoint."""
    train(load_config(None, _overrides(tmp_path, "run")), progress=False)
    with pytest.raises(ValueError, match=f"is at step {STEPS}, past train.steps 2"):
        train(load_config(None, _overrides(tmp_path, "run", steps=2)), progress=False)
    with pytest.raises(ValueError, match="does not fit the model"):
        train(load_config(None, _overrides(tmp_path, "run", extra=["model.intermediate_size=96"])), progress=False)
