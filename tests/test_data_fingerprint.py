"""rwkv_jax.data.fingerprint: what a run records about its data and compares on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import DataError, TokenSource
from rwkv_jax.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepared(tmp_path, text="hello world " * 200_000, name="p"):
    (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    return data.prepare([tmp_path / f"{name}.txt"], tmp_path / name, ByteTokenizer())


def test_fields_json_and_stable_across_processes(tmp_path):
    src = _prepared(tmp_path)
    fp = data.fingerprint(src)
    assert json.loads(json.dumps(fp)) == fp
    assert fp["n_tokens"] == len(src) and fp["dtype"] == "uint16"
    assert fp["size"] == 2 * len(src) > 2 << 20  # head and tail are different MiB
    assert fp["head_sha256"] != fp["tail_sha256"] and fp["tokenizer"] == {"type": "bytes"}
    assert fp["format"] == "prepared" and fp["mask"] is None and fp["n_docs"] == 1
    code = ("import json, sys; from rwkv_jax import data; "
            "print(json.dumps(data.fingerprint(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "7"})
    assert json.loads(out.stdout) == fp  # by path, in another process
    assert data.fingerprint_diff(fp, data.fingerprint(data.read_prepared(tmp_path / "p"))) == {}


def test_changes_are_reported_and_classified(tmp_path):
    src = _prepared(tmp_path)
    fp = data.fingerprint(src)
    bin_path = tmp_path / "p.bin"
    raw = bytearray(bin_path.read_bytes())
    # same bytes, new mtime (a rebuilt cache entry): only mtime_ns differs, no content key
    st = bin_path.stat()
    os.utime(bin_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    diff = data.fingerprint_diff(fp, data.fingerprint(data.read_prepared(tmp_path / "p")))
    assert set(diff) == {"mtime_ns"} and not set(diff) & set(data.CONTENT_KEYS)
    # one byte changed in the last MiB: tail_sha256 differs
    raw[-3] ^= 1
    bin_path.write_bytes(bytes(raw))
    diff = data.fingerprint_diff(fp, data.fingerprint(data.read_prepared(tmp_path / "p")))
    assert "tail_sha256" in diff and "head_sha256" not in diff
    # other data altogether
    other = data.fingerprint(_prepared(tmp_path, "other text", name="q"))
    diff = data.fingerprint_diff(fp, other)
    assert {"size", "n_tokens", "head_sha256", "path"} <= set(diff)


def test_mask_tokenizer_and_memory_sources(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n", encoding="utf-8")
    src = data.prepare([p], tmp_path / "c", ByteTokenizer(), loss_on="response")
    fp = data.fingerprint(src)
    assert set(fp["mask"]) == {"head_sha256", "tail_sha256"}
    plain = data.fingerprint(data.prepare([p], tmp_path / "d", ByteTokenizer()))
    assert data.fingerprint_diff(fp, plain).keys() & {"mask"}
    mem = data.fingerprint(TokenSource(np.arange(10, dtype=np.uint16), ByteTokenizer()))
    assert mem["path"] is None and mem["mtime_ns"] is None and mem["n_tokens"] == 10
    assert mem["tokenizer"] == {"type": "bytes"}
    assert data.fingerprint(TokenSource(np.arange(10, dtype=np.uint16)))["tokenizer"] is None


def test_paths(tmp_path):
    data.write_binidx(tmp_path / "bi", [[1, 2], [3]])
    fp = data.fingerprint(tmp_path / "bi")
    assert fp["format"] == "binidx" and fp["n_tokens"] == 3 and fp["n_docs"] == 2
    (tmp_path / "t.txt").write_text("text", encoding="utf-8")
    fp = data.fingerprint(tmp_path / "t.txt")  # a text file: bytes only, not tokenized
    assert fp["format"] == "file" and fp["size"] == 4 and fp["n_tokens"] is None
    with pytest.raises(DataError, match="no such file"):
        data.fingerprint(tmp_path / "missing")
