"""Property-based fuzzing of checkpoint files (hypothesis): random bytes and random JSON edits of config.json,
tokenizer.json, the safetensors header and GGUF metadata. Every case must end in a correct load or a
documented error (LayerSkipError / FileNotFoundError): never another exception, a crash, a hang or an
unbounded allocation. Loads run in a worker process (tests/fuzz_load_worker.py) under an address-space
limit, with a timeout per case; the worker is restarted after it dies.
"""
import json
import os
import select
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_hf_checkpoint

MEMORY_LIMIT = 4 << 30  # bytes of address space for the worker
TIMEOUT_S = 120  # per case, generous for a loaded 2-core machine
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=260, tie_word_embeddings=False)


class Worker:
    """A fuzz_load_worker.py process: load(path) -> its answer line, or 'dead ...' / 'timeout'."""

    def __init__(self):
        self.proc = None

    def start(self):
        script = os.path.join(os.path.dirname(__file__), "fuzz_load_worker.py")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, script, str(MEMORY_LIMIT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self._read(TIMEOUT_S) == "ready"

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().rstrip("\n")

    def load(self, path: str) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        answer = self._read(TIMEOUT_S)
        if answer is None:
            self.close()
            return "timeout"
        if answer == "":
            code = self.proc.wait()
            self.proc = None
            return f"dead (exit status {code})"
        return answer

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny HF checkpoint with a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("base") / "m", **TINY)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def base_gguf(base_dir, tmp_path_factory):
    import gguf
    from safetensors.torch import load_file
    from test_checkpoint import write_gguf
    state = load_file(os.path.join(base_dir, "model.safetensors"))
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", state, config, gguf.GGMLQuantizationType.Q8_0)


def check(worker, path):
    answer = worker.load(str(path))
    assert answer == "ok" or answer.startswith("error "), f"{path}: {answer}"
    return answer


# JSON values: scalars of every kind (including huge, negative, NaN-ish strings) and small nested containers
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=12),
                         st.sampled_from([0, -1, 1, 2**31, 2**63, 10**9, 1e-300, 1e300, "false", "llama", ""]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def copy_base(base_dir, tmp_path, name):
    target = tmp_path / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base_dir, target)
    return target


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(
    ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
     "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
     "max_position_embeddings", "bos_token_id", "eos_token_id", "model_type", "rope_parameters"]),
    st.one_of(json_values, st.just("DELETE"))), min_size=1, max_size=3))
def test_config_json_edits(worker, base_dir, tmp_path, edits):
    d = copy_base(base_dir, tmp_path, "c")
    with open(d / "config.json") as f:
        config = json.load(f)
    for key, value in edits:
        if value == "DELETE":
            config.pop(key, None)
        else:
            config[key] = value
    with open(d / "config.json", "w") as f:
        json.dump(config, f)
    check(worker, d)


@SETTINGS
@given(name=st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]), data=st.binary(max_size=300))
def test_random_bytes(worker, base_dir, tmp_path, name, data):
    d = copy_base(base_dir, tmp_path, "b")
    (d / name).write_bytes(data)
    check(worker, d)


@SETTINGS
@given(key=st.sampled_from(["model", "pre_tokenizer", "decoder", "added_tokens", "normalizer", "version"]),
       value=json_values, cut=st.integers(min_value=0, max_value=4000))
def test_tokenizer_json_edits(worker, base_dir, tmp_path, key, value, cut):
    d = copy_base(base_dir, tmp_path, "t")
    text = (d / "tokenizer.json").read_text()
    tok = json.loads(text)
    tok[key] = value
    (d / "tokenizer.json").write_text(json.dumps(tok) if cut % 2 == 0 else text[:cut])
    check(worker, d)


@SETTINGS
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "NAME"]), value=json_values,
       header_length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)))
def test_safetensors_header_edits(worker, base_dir, tmp_path, field, value, header_length):
    d = copy_base(base_dir, tmp_path, "s")
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    if field == "NAME":
        header[str(value)[:40]] = header.pop(name)
    elif field == "__metadata__":
        header["__metadata__"] = value
    else:
        header[name][field] = value
    new = json.dumps(header).encode()
    length = len(new) if header_length is None else header_length
    (d / "model.safetensors").write_bytes(struct.pack("<Q", length) + new + raw[8 + n:])
    check(worker, d)


@SETTINGS
@given(position=st.integers(min_value=0, max_value=2000), data=st.binary(min_size=1, max_size=8),
       truncate=st.booleans())
def test_gguf_metadata_bytes(worker, base_gguf, tmp_path, position, data, truncate):
    """Overwrites bytes in the header and metadata region (counts, lengths, types, values) or truncates."""
    raw = bytearray(open(base_gguf, "rb").read())
    if truncate:
        raw = raw[:position]
    else:
        raw[position:position + len(data)] = data
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw))
    check(worker, path)


@SETTINGS
@given(key=st.sampled_from(["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                            "attention.head_count_kv", "context_length", "rope.freq_base",
                            "attention.layer_norm_rms_epsilon", "vocab_size", "rope.dimension_count"]),
       value=st.one_of(st.integers(min_value=0, max_value=2**32 - 1), st.floats(allow_nan=True, width=32),
                       st.text(max_size=6)))
def test_gguf_metadata_values(worker, base_dir, tmp_path, key, value):
    """A GGUF whose llama.* metadata has another value or type (written with gguf's own writer)."""
    import gguf
    from safetensors.torch import load_file
    from test_checkpoint import write_gguf
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(base_dir, "model.safetensors"))
    path = tmp_path / "m.gguf"

    original = gguf.GGUFWriter.add_key_value

    def add_key_value(self, k, v, vtype, *args, **kwargs):
        if k == f"llama.{key}":
            vtype = (gguf.GGUFValueType.STRING if isinstance(value, str) else
                     gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32)
            v = value
        return original(self, k, v, vtype, *args, **kwargs)

    gguf.GGUFWriter.add_key_value = add_key_value
    try:
        write_gguf(path, state, config, gguf.GGMLQuantizationType.F32)
    finally:
        gguf.GGUFWriter.add_key_value = original
    check(worker, path)


def test_the_unmodified_files_load(worker, base_dir, base_gguf):
    """The fuzz bases themselves load (so an 'error' answer above is about the edit)."""
    assert worker.load(base_dir) == "ok"
    assert worker.load(base_gguf) == "ok"
