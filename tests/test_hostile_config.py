"""Hostile checkpoints: absurd or mistyped config values, malformed JSON, garbage tokenizers and shard paths
leading out of the model directory all end in a CheckpointError / ConfigError naming the file and field
(never a crash, an unbounded allocation or a silently wrong model)."""
import json
import os
import shutil

import pytest
import torch

import layerskip_ext
from layerskip_ext import CheckpointError, ConfigError, LayerSkipError, ModelConfig
from layerskip_ext.generation import GenerationArgs
from layerskip_ext.reference import ReferenceLlama
from conftest import make_hf_checkpoint

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, tie_word_embeddings=False)
GOOD = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "m", **TINY)


def copy_with_config(src, dst, edit):
    """A copy of checkpoint directory src at dst whose config.json is edit(config dict) (or raw text)."""
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    new = edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(new if isinstance(new, str) else json.dumps(new))
    return str(dst)


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, LayerSkipError) and issubclass(ConfigError, LayerSkipError)
    assert issubclass(LayerSkipError, ValueError)


@pytest.mark.parametrize("key,value", [
    ("num_hidden_layers", 10**9), ("hidden_size", 10**7), ("intermediate_size", 10**9), ("vocab_size", 10**9),
    ("max_position_embeddings", 10**7), ("num_attention_heads", 10**6), ("head_dim", 10**6),
])
def test_absurd_sizes_are_refused_before_any_allocation(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf_dict(dict(GOOD, **{key: value}))


def test_absurd_layer_count_in_a_checkpoint_names_the_file(tiny_dir, tmp_path):
    bad = copy_with_config(tiny_dir, tmp_path / "bad", lambda c: dict(c, num_hidden_layers=10**9))
    with pytest.raises(CheckpointError, match="config.json.*num_hidden_layers") as info:
        layerskip_ext.load(bad)
    assert info.value.path.endswith("config.json") and info.value.field == "num_hidden_layers"


def test_rope_table_is_sized_by_the_context_used_not_the_maximum():
    config = ModelConfig.from_hf_dict(dict(GOOD, max_position_embeddings=1 << 21))
    module = ReferenceLlama(config).eval()
    with torch.no_grad():
        module(torch.tensor([[1, 2, 3, 4, 5]]))
    assert module.rope_cache(5).shape[0] <= 256  # not 2M positions x head_dim
    long = module.rope_cache(1000)  # grows on demand, same values as a table built at once
    assert long.shape[0] >= 1000
    from layerskip_ext.reference import rope_cos_sin_cache
    torch.testing.assert_close(long[:1000], rope_cos_sin_cache(config, 1000), rtol=0, atol=0)


def test_engine_rope_table_is_sized_by_the_context_reached(tmp_path, monkeypatch):
    """The engine's table covers the positions its rows reach (grown on demand), not max_position_embeddings:
    a model allowing 2M positions builds no table past 1024 for a 5 + 600 token generation."""
    from layerskip_ext import reference
    from layerskip_ext.engine import Engine, get_engine
    path = make_hf_checkpoint(tmp_path / "m", **dict(TINY, max_position_embeddings=1 << 21))
    model = layerskip_ext.load(path)
    built = []
    real = reference.cos_sin_table

    def spy(inv_freq, max_positions):  # refuses big tables before allocating them
        built.append(max_positions)
        assert max_positions <= 4096, f"a rotary table of {max_positions} positions was built"
        return real(inv_freq, max_positions)

    monkeypatch.setattr(reference, "cos_sin_table", spy)
    short = layerskip_ext.generate(model, [1, 2, 3, 4, 5], max_new_tokens=8, backend="engine", stop_token_ids=[])
    engine = get_engine(model)
    assert engine.rope_positions <= 512 and len(short.tokens) == 8
    long = layerskip_ext.generate(model, [1, 2, 3, 4, 5], max_new_tokens=600, backend="engine", stop_token_ids=[])
    assert 606 <= engine.rope_positions <= 1024 and max(built) <= 1024
    # the grown table gives the tokens of an engine whose table covered every position from the start
    args = GenerationArgs([1, 2, 3, 4, 5], 600, "autoregressive", 2, 1, 0.0, 0, 1.0, 0, (), 1 << 21)
    whole = Engine(model, capacity=1024).generate(args)
    assert long.tokens == whole.tokens and long.tokens[:8] == short.tokens


@pytest.mark.parametrize("edit,field", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps"),
    (dict(rope_theta="10000"), "rope_theta"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 0}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": -2.0}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": float("nan")}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
     "rope_scaling.high_freq_factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}),
     "rope_scaling.original_max_position_embeddings"),
    (dict(rope_scaling=[1, 2]), "rope_scaling"),
    (dict(eos_token_id=64), "eos_token_id"),
    (dict(eos_token_id=[2, -1]), "eos_token_id"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(bos_token_id=10**6), "bos_token_id"),
    (dict(num_hidden_layers="2"), "num_hidden_layers"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(max_position_embeddings=None), "max_position_embeddings"),
])
def test_wrong_types_and_ranges_name_the_field(edit, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict(dict(GOOD, **edit))
    assert info.value.field == field
    assert field.split(".")[-1] in str(info.value)


def test_valid_configs_still_load_with_normalised_values():
    c = ModelConfig.from_hf_dict(dict(GOOD, rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                                                         "high_freq_factor": 4,
                                                         "original_max_position_embeddings": 64}))
    assert c.rope_scaling["factor"] == 8.0 and c.eos_token_ids == (2,) and c.tie_word_embeddings is False
    import numpy as np
    c = ModelConfig(num_layers=np.int64(2), hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=64, vocab_size=64, eos_token_ids=(np.int32(3),))
    assert type(c.num_layers) is int and c.eos_token_ids == (3,) and type(c.eos_token_ids[0]) is int


@pytest.mark.parametrize("text", [
    "[1, 2, 3]", '"llama"', "3", "null", "[" * 100000 + "]" * 100000, '{"model_type": "llama", "a": ' + "[" * 50000,
    "{\"model_type\": \"llama\"}", "\xff\xfe not utf-8",
])
def test_malformed_config_json_is_a_checkpoint_error(tiny_dir, tmp_path, text):
    bad = copy_with_config(tiny_dir, tmp_path / "bad", lambda c: text)
    if text.startswith("\xff"):
        with open(os.path.join(bad, "config.json"), "wb") as f:
            f.write(b"\xff\xfe{not utf-8")
    with pytest.raises(CheckpointError) as info:
        layerskip_ext.load(bad)
    assert "config.json" in str(info.value)


def test_garbage_tokenizer_json_is_a_checkpoint_error(tiny_dir, tmp_path):
    for i, garbage in enumerate(['{"model": 3}', "not json at all", '{"version": "1.0", "model": {"type": "BPE", '
                                 '"vocab": [1, 2]}}']):
        bad = copy_with_config(tiny_dir, tmp_path / f"bad{i}", lambda c: c)
        with open(os.path.join(bad, "tokenizer.json"), "w") as f:
            f.write(garbage)
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            layerskip_ext.load(bad)


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "ABSOLUTE", "sub/../../outside/model.safetensors"])
def test_sharded_index_cannot_name_files_outside_the_model_directory(tiny_dir, tmp_path, shard):
    outside = tmp_path / "outside"
    shutil.copytree(tiny_dir, outside)  # a real, loadable safetensors file next to the model directory
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), model_dir / "config.json")
    (model_dir / "sub").mkdir()
    if shard == "ABSOLUTE":
        shard = str(outside / "model.safetensors")
    from safetensors import safe_open
    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    with open(model_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {name: shard for name in names}}, f)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        layerskip_ext.load(str(model_dir))


def test_shards_inside_the_directory_still_load(tiny_dir, tmp_path):
    model_dir = tmp_path / "model"
    os.makedirs(model_dir / "shards")
    shutil.copy(os.path.join(tiny_dir, "config.json"), model_dir / "config.json")
    shutil.copy(os.path.join(tiny_dir, "model.safetensors"), model_dir / "shards" / "a.safetensors")
    from safetensors import safe_open
    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    with open(model_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {name: "shards/./a.safetensors" for name in names}}, f)
    model = layerskip_ext.load(str(model_dir))
    assert model.config.num_layers == 2


def test_nothing_in_the_package_unpickles():
    """Loading a file never runs code: no torch.load / pickle in layerskip_ext outside training/ (which
    resumes from safetensors/JSON or weights_only=True; checked by the training tests)."""
    root = os.path.dirname(layerskip_ext.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                source = f.read()
            for forbidden in ("torch.load(", "import pickle", "pickle.load", "weights_only=False", "numpy.load(",
                              "np.load("):
                assert forbidden not in source, f"{name} uses {forbidden}"


@pytest.mark.parametrize("device", ["tpu", 5, "cuda:x", "meta", object()])
def test_load_refuses_bad_devices_with_a_layerskip_error(tiny_dir, device):
    """torch's own errors came through ('Expected one of cpu, cuda, ...', 'Cannot access accelerator device
    when none is available'); README: a bad device is a LayerSkipError."""
    with pytest.raises(LayerSkipError, match="device"):
        layerskip_ext.load(tiny_dir, device=device)


@pytest.mark.parametrize("path", [123, b"/tmp", 1.5, ["a"]])
def test_load_refuses_paths_of_the_wrong_type(path):
    """'expected str, bytes or os.PathLike object, not int' / "Can't mix strings and bytes" named no argument."""
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        layerskip_ext.load(path)
