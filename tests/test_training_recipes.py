"""Recipes end to end on a tiny model: pretraining from scratch (BPE tokenizer + Llama), HF-format checkpoints read
by transformers and layerskip_ext.load, exact resume, fine-tuning on prompt/response pairs, config errors."""
import json
import os
import random

import pytest
import torch

import layerskip_ext
from layerskip_ext.training.cli import main as cli_main
from layerskip_ext.training.config import load_config
from layerskip_ext.training.data import read_examples
from layerskip_ext.training.trainer import train

WORDS = "the a cat dog sat ran on under mat tree quickly slowly and then it was".split()


def write_corpus(directory, n_lines=400, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_lines)]
    paths = {}
    for split, part in (("train", lines[: n_lines - 40]), ("valid", lines[n_lines - 40:])):
        paths[split] = os.path.join(directory, f"{split}.txt")
        with open(paths[split], "w") as f:
            f.write("\n".join(part) + "\n")
    return paths


def tiny_overrides(tmp_path, out="run", kind="hf", steps=4, extra=()):
    paths = write_corpus(str(tmp_path))
    return [f"out_dir={json.dumps(str(tmp_path / out))}", f"model.kind={json.dumps(kind)}",
            "model.num_layers=3", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=64", "tokenizer.vocab_size=300",
            "tokenizer.min_frequency=1", f"data.train={json.dumps([paths['train']])}",
            f"data.valid={json.dumps([paths['valid']])}", "data.seq_len=16", f"train.steps={steps}",
            "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=2",
            "train.save_every=2", "train.log_every=1", "train.threads=1", "layer_dropout.p_max=0.3",
            "early_exit.enabled=true", "early_exit.curriculum=\"rotational\"", *extra]


@pytest.mark.parametrize("kind", ["hf", "reference"])
def test_pretrain_checkpoint_is_read_by_transformers_and_layerskip_ext(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    result = train(load_config(None, tiny_overrides(tmp_path, kind=kind)), progress=False)
    lm = result["model"].eval()
    final = result["final_dir"]
    assert sorted(os.listdir(final)) == ["config.json", "model.safetensors", "tokenizer.json"]
    ids = torch.tensor([result["tokenizer"].encode("the cat sat on the mat.").ids])
    with torch.no_grad():
        want = lm(ids) if kind == "reference" else lm(input_ids=ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
        ours = layerskip_ext.load(final)
        torch.testing.assert_close(hf(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.module(ids), want, rtol=1e-4, atol=1e-4)
    assert ours.tokenizer.encode("the dog").ids == result["tokenizer"].encode("the dog").ids
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert set(log[1]["val_ce"]) == {"1", "2", "3"}
    assert log[-1]["final_ce"] < log[0]["final_ce"]  # it learns


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    first = train(load_config(None, tiny_overrides(tmp_path, out="a")), progress=False)
    want = {k: v.clone() for k, v in first["model"].state_dict().items()}
    run = tmp_path / "a"
    # pretend the run stopped after step 2: drop the later checkpoint and the export
    for d in ("checkpoints/step_0000004", "final"):
        for f in os.listdir(run / d):
            os.remove(run / d / f)
        os.rmdir(run / d)
    assert os.listdir(run / "checkpoints") == ["step_0000002"]
    resumed = train(load_config(None, tiny_overrides(tmp_path, out="a")), progress=False)
    got = resumed["model"].state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_finetune_masks_the_prompt(tmp_path):
    pre = train(load_config(None, tiny_overrides(tmp_path, out="pre", steps=2)), progress=False)
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"the cat {WORDS[i % 16]}", "response": " sat on the mat."}) + "\n")
    tok = pre["tokenizer"]
    inputs, labels = read_examples(tok, [str(data)], seq_len=16, eos=0)
    p = len(tok.encode("the cat the").ids)
    assert (labels[0, : p - 1] == -100).all() and (labels[0, p - 1:p + 3] != -100).all()
    assert labels[0, p - 1] == tok.encode(" sat on the mat.").ids[0]
    ft = ["recipe=\"finetune\"", f"model.init={json.dumps(pre['final_dir'])}", "data.format=\"jsonl\"",
          f"data.train={json.dumps([str(data)])}", f"data.valid={json.dumps([str(data)])}"]
    result = train(load_config(None, tiny_overrides(tmp_path, out="ft", steps=2, extra=ft)), progress=False)
    assert os.path.isfile(os.path.join(result["final_dir"], "model.safetensors"))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys in train"):
        load_config(None, tiny_overrides(tmp_path, extra=["train.stepz=3"]))
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_config(None, tiny_overrides(tmp_path, extra=["recipe=\"continual\""]))
    with pytest.raises(ValueError, match="train.steps"):
        load_config(None, tiny_overrides(tmp_path, steps=0))
    with pytest.raises(FileNotFoundError, match="data.train file 'no-such.txt'"):
        train(load_config(None, tiny_overrides(tmp_path, extra=['data.train=["no-such.txt"]'])), progress=False)


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli_main(["train", "--config", "no-such-config"]) == 2
    assert "bundled config" in capsys.readouterr().err
    overrides = sum((["--set", o] for o in tiny_overrides(tmp_path, extra=['data.valid=["gone.txt"]'])), [])
    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["train", "--config", str(tmp_path / "config.json"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerskip-ext train: error:") and "data.valid file 'gone.txt' does not exist" in err


@pytest.mark.parametrize("override,message", [
    ('layer_dropout.schedule="cubic"', "layer_dropout.schedule"),
    ('layer_dropout.time_schedule="cosine"', "layer_dropout.time_schedule"),
    ("layer_dropout.p_max=1.5", "layer_dropout.p_max"),
    ('layer_dropout.p_max="0.1"', "layer_dropout.p_max"),
    ('early_exit.scale="square"', "early_exit.scale"),
    ('early_exit.curriculum="random"', "early_exit.curriculum"),
    ("early_exit.e_scale=-1", "early_exit.e_scale"),
    ("early_exit.rotational_period=0", "early_exit.rotational_period"),
    ("early_exit.gradual_span=1.5", "early_exit.gradual_span"),
    # found by a hostile-input audit: each was accepted (NaN training that exited 0, a string "False" taken as
    # true, a bool as 1, a negative lr floor, keep_checkpoints -1 deleting every checkpoint, float exits dropped)
    ("train.lr=Infinity", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("early_exit.e_scale=NaN", "early_exit.e_scale"),
    ("early_exit.e_scale=Infinity", "early_exit.e_scale"),
    ("train.weight_decay=NaN", "train.weight_decay"),
    ("train.grad_clip=NaN", "train.grad_clip"),
    ("early_exit.enabled=False", "early_exit.enabled"),  # not JSON: the string "False"
    ("resume=\"no\"", "resume"),
    ("layer_dropout.p_max=true", "layer_dropout.p_max"),
    ("train.steps=true", "train.steps"),
    ("train.min_lr_ratio=-5", "train.min_lr_ratio"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.warmup_steps=-3", "train.warmup_steps"),
    ("train.lr=\"abc\"", "train.lr"),
    ("seed=1.5", "seed"),
    ("train.threads=-1", "train.threads"),
    ("early_exit.exit_layers=[0.5]", "early_exit.exit_layers"),
    ('early_exit.exit_layers="0"', "early_exit.exit_layers"),
    ("layer_dropout.layers=1", "layer_dropout.layers"),
    ('data.train="a.txt"', "data.train"),
    ("recipe.x=1", "recipe"),
    ("data.seq_len=100", "exceeds model.max_position_embeddings"),  # exported a model that cannot take seq_len
])
def test_layerskip_option_errors_come_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, tiny_overrides(tmp_path, extra=[override]))


def test_non_finite_loss_stops_training(tmp_path):
    """A loss that is not finite ends the run with an error naming the step, before the optimizer step (a fine-tune
    whose every example has its response beyond seq_len has no target tokens: CE 0/0 = NaN, and the run exited 0)."""
    pre = train(load_config(None, tiny_overrides(tmp_path, out="pre", steps=1)), progress=False)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat sat on the mat " * 20, "response": " yes"}) + "\n"
                            for _ in range(8)))
    ft = ["recipe=\"finetune\"", f"model.init={json.dumps(pre['final_dir'])}", "data.format=\"jsonl\"",
          f"data.train={json.dumps([str(data)])}", f"data.valid={json.dumps([str(data)])}"]
    with pytest.raises(ValueError, match="step 1: the training loss is nan"):
        train(load_config(None, tiny_overrides(tmp_path, out="ft", steps=2, extra=ft)), progress=False)


def test_bundled_configs_parse():
    pytest.importorskip("yaml")
    from layerskip_ext.training.config import default_config_dir
    names = sorted(os.listdir(default_config_dir()))
    assert "demo-layerskip.yaml" in names and "demo-plain.yaml" in names
    for name in names:
        load_config(os.path.join(default_config_dir(), name))


@pytest.mark.parametrize("extra,message", [
    (["--seq-len", "0"], "--seq-len must be >= 1"),  # was a ZeroDivisionError traceback
    (["--windows", "0"], "--windows must be >= 1"),  # was "fewer than seq_len + 1" tokens
    (["--accept-exits", "99"], "--accept-exits [99] out of range"),  # was skipped silently
    (["--accept-exits", "2,x"], "--accept-exits must be comma-separated"),
])
def test_eval_argument_errors_exit_2_with_a_message(tmp_path, capsys, extra, message):
    demo = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-demo")
    valid = write_corpus(str(tmp_path))["valid"]
    code = cli_main(["eval", "--model", demo, "--valid", valid, "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_config_and_data_files_that_do_not_parse_name_the_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(str(bad_yaml))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config(str(bad_json))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-code16",
                                           "tokenizer.json"))
    for line, message in (('{"prompt": 5, "response": "x"}', "must be strings"), ("{oops", "not valid JSON")):
        data = tmp_path / "ft.jsonl"
        data.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"ft.jsonl:1: .*{message}"):
            read_examples(tok, [str(data)], 16, None)


def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused(tmp_path):
    """continual pretraining of a 300-token model with a 2048-token tokenizer: a clear error before training (was an
    IndexError from the embedding)."""
    pre = train(load_config(None, tiny_overrides(tmp_path, out="pre", steps=1)), progress=False)
    big = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "layerskip-code16", "tokenizer.json")
    extra = ["recipe=\"continual\"", f"model.init={json.dumps(pre['final_dir'])}", f"tokenizer.path={json.dumps(big)}"]
    with pytest.raises(ValueError, match="the tokenizer has 2048 tokens but the checkpoint"):
        train(load_config(None, tiny_overrides(tmp_path, out="cont", steps=1, extra=extra)), progress=False)
