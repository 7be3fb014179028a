"""The error contract of the README ("Errors: what each call raises") beyond generate/load's arguments: files
stored beside a model (tuned settings, draft vocabulary, tokenizer_config.json) raise CheckpointError naming the
file and field; bad arguments to chat, stream, stop strings, the engine and the tuner raise LayerSkipError; numpy
integers are accepted wherever an integer is."""
import json
import os

import numpy as np
import pytest
import torch

import layerskip_ext
from layerskip_ext import CheckpointError, LayerSkipError
from layerskip_ext.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from layerskip_ext.settings import FILE_NAME as SETTINGS_FILE
from conftest import make_hf_checkpoint

TINY = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=40, tie_word_embeddings=False, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "m", **TINY)


def with_file(tiny_dir, tmp_path, name, content):
    """A copy of the checkpoint with `name` written beside it (a dict as JSON, or raw text)."""
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dir, dst)
    with open(dst / name, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(dst)


SETTINGS = dict(format="layerskip_settings", version=1, num_layers=3, exit_layer=1, num_speculations=2)


@pytest.mark.parametrize("content,field", [
    ("{not json", None),
    ([1, 2], None),
    (dict(SETTINGS, exit_layer=7), "exit_layer"),
    (dict(SETTINGS, num_layers=5), "num_layers"),
    (dict(SETTINGS, adaptive="yes"), "adaptive"),
])
def test_corrupt_settings_file_is_a_checkpoint_error(tiny_dir, tmp_path, content, field):
    path = with_file(tiny_dir, tmp_path, SETTINGS_FILE, content)
    with pytest.raises(CheckpointError) as info:
        layerskip_ext.load(path)
    assert info.value.path == os.path.join(path, SETTINGS_FILE) and info.value.field == field


@pytest.mark.parametrize("content,field", [
    ("\xff{", None),
    (dict(format="layerskip_draft_vocab", version=1, vocab_size=41, token_ids=[1]), "vocab_size"),
    (dict(format="layerskip_draft_vocab", version=1, vocab_size=40, token_ids=[1, 40]), "token_ids"),
    (dict(format="layerskip_draft_vocab", version=1, vocab_size=40, token_ids=[3, 3]), "token_ids"),
])
def test_corrupt_draft_vocab_file_is_a_checkpoint_error(tiny_dir, tmp_path, content, field):
    path = with_file(tiny_dir, tmp_path, DRAFT_VOCAB_FILE, content)
    with pytest.raises(CheckpointError) as info:
        layerskip_ext.load(path)
    assert info.value.path == os.path.join(path, DRAFT_VOCAB_FILE) and info.value.field == field


def test_corrupt_tokenizer_config_is_a_checkpoint_error(tiny_dir, tmp_path):
    model = layerskip_ext.load(with_file(tiny_dir, tmp_path, "tokenizer_config.json", "{oops"))
    with pytest.raises(CheckpointError, match="tokenizer_config.json") as info:
        layerskip_ext.apply_chat_template(model, [{"role": "user", "content": "hi"}])
    assert info.value.path.endswith("tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return layerskip_ext.load(tiny_dir)


@pytest.mark.parametrize("call", [
    lambda m: layerskip_ext.apply_chat_template(m, [], chat_template="{{ messages }}"),
    lambda m: layerskip_ext.apply_chat_template(m, [{"role": "user"}], chat_template="{{ messages }}"),
    lambda m: layerskip_ext.apply_chat_template(m, [{"role": "user", "content": "x"}], chat_template=""),
    lambda m: layerskip_ext.apply_chat_template(m, [{"role": "user", "content": "x"}]),  # no template
    lambda m: layerskip_ext.apply_chat_template(m, [{"role": "user", "content": "x"}],
                                                chat_template="{{ raise_exception('no') }}"),
    lambda m: layerskip_ext.chat(m, [{"role": "user", "content": "x"}], chat_template="{{ messages }}"),  # no tok.
    lambda m: layerskip_ext.generate(m, [1, 2], max_new_tokens=2, stop=[""]),
    lambda m: layerskip_ext.generate(m, [1, 2], max_new_tokens=2, stop=5),
    lambda m: layerskip_ext.generate(m, [1, 2], max_new_tokens=2, strategy="self_speculative", exit_layer=1,
                                     num_speculations=2, draft_vocab_size=4),  # no stored draft vocabulary
    lambda m: layerskip_ext.generate(m, [1, 2], max_new_tokens=2, strategy="self_speculative", exit_layer=1,
                                     num_speculations=2, draft_vocab_size=2.5),
    lambda m: layerskip_ext.generate(m, [1, 2], max_new_tokens=2, context_length=np.int64(65)),
    lambda m: list(layerskip_ext.stream(m, [1, 2], max_new_tokens=2, on_token=print)),
    lambda m: layerskip_ext.engine.Engine(m, weight_dtype=torch.float16),
])
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nothing fails in a __del__
def test_bad_arguments_raise_layerskip_error(tiny, call):
    with pytest.raises(LayerSkipError):
        call(tiny)
    assert layerskip_ext.generate(tiny, [1, 2], max_new_tokens=2, stop_token_ids=[]).tokens  # still usable


def test_tuner_arguments_raise_layerskip_error(tiny, tmp_path):
    from layerskip_ext.tune import tune
    for kwargs in (dict(exit_layers=[3]), dict(draft_lengths=[0]), dict(thresholds=[1.5])):
        args = dict(exit_layers=[1], draft_lengths=[1], thresholds=[0.0], adaptive_modes=[False])
        args.update(kwargs)
        with pytest.raises(LayerSkipError):
            tune(tiny, [[1, 2, 3]], str(tmp_path), save=False, log=lambda *a: None, **args)


def test_numpy_integers_for_context_length_and_draft_vocab_size(tiny):
    expected = layerskip_ext.generate(tiny, [1, 2], max_new_tokens=4, context_length=6, stop_token_ids=[])
    got = layerskip_ext.generate(tiny, [1, 2], max_new_tokens=4, context_length=np.int32(6), stop_token_ids=[])
    assert got.tokens == expected.tokens
