"""rwkv_jax.data: token files, cache, default corpus, splits, step-keyed sampling, eval windows.

The tokenizers here are small stand-ins with the Tokenizer interface, so these tests do not
depend on rwkv_jax.tokenizers; one test at the end uses the real ones when they import.
"""

from __future__ import annotations

import json
import os
import pathlib
import sysconfig

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import DataError


class ByteStandIn:
    """UTF-8 bytes as ids (vocab 256)."""

    name = "bytes-standin"
    vocab_size = 256

    def __init__(self):
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name}


class CodepointStandIn(ByteStandIn):
    """Unicode code points as ids: vocab > 65536, so prepared files are uint32."""

    name = "codepoint-standin"
    vocab_size = 0x110000

    def encode(self, text):
        self.calls += 1
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class TinyVocab(CodepointStandIn):
    vocab_size = 200  # encodes code points, so "\u0100" is out of range


class WorldNamedStandIn(ByteStandIn):
    name = "world-standin"  # "world" in the name: prepare() separates documents with id 0


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# --- prepare --------------------------------------------------------------------------------

def test_prepare_txt_round_trip_uint16(tmp_path):
    a = _write(tmp_path / "a.txt", "hello\r\nworld\n")
    b = _write(tmp_path / "b.md", "ünïcode ✓\n")
    src = data.prepare([a, b], tmp_path / "out" / "corpus", ByteStandIn())
    want = list((a.read_bytes() + b.read_bytes()))  # line endings kept, no separator for bytes
    np.testing.assert_array_equal(src.tokens, want)
    assert src.tokens.dtype == np.uint16 and isinstance(src.tokens, np.memmap)
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == len(want)
    assert meta["tokenizer"] == {"name": "bytes-standin"} and meta["doc_separator"] is None
    assert [s["bytes"] for s in meta["sources"]] == [a.stat().st_size, b.stat().st_size]
    assert sum(s["n_tokens"] for s in meta["sources"]) == len(want)
    assert (tmp_path / "out" / "corpus.bin").stat().st_size == 2 * len(want)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.bin", "corpus.json"]
    again = data.read_prepared(tmp_path / "out" / "corpus", ByteStandIn())
    np.testing.assert_array_equal(again.tokens, want)


def test_prepare_uint32_when_vocab_exceeds_uint16(tmp_path):
    text = "a\U0001F600b" * 3
    src = data.prepare(_write(tmp_path / "e.txt", text), tmp_path / "e", CodepointStandIn())
    assert src.tokens.dtype == np.uint32
    np.testing.assert_array_equal(src.tokens, [ord(c) for c in text])
    assert json.loads((tmp_path / "e.json").read_text())["dtype"] == "uint32"
    assert data.token_dtype(65536) == np.uint16 and data.token_dtype(65537) == np.uint32


def test_prepare_jsonl_documents_and_separator(tmp_path):
    lines = [json.dumps({"text": "ab"}), "", json.dumps({"text": "c\n", "meta": 1})]
    p = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    src = data.prepare([p], tmp_path / "d", WorldNamedStandIn())  # auto separator: 0
    np.testing.assert_array_equal(src.tokens, [97, 98, 0, 99, 10, 0])
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["sources"][0]["n_docs"] == 2 and meta["doc_separator"] == 0
    src = data.prepare([p], tmp_path / "d2", ByteStandIn())  # auto separator for bytes: none
    np.testing.assert_array_equal(src.tokens, [97, 98, 99, 10])
    src = data.prepare([p], tmp_path / "d3", ByteStandIn(), doc_separator=7)
    np.testing.assert_array_equal(src.tokens, [97, 98, 7, 99, 10, 7])


@pytest.mark.parametrize("bad", ['{"text": "x"', '{"txt": "x"}', '["x"]', '{"text": 3}'])
def test_prepare_jsonl_bad_line_names_file_and_line(tmp_path, bad):
    p = _write(tmp_path / "bad.jsonl", f'{{"text": "ok"}}\n\n{bad}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        data.prepare([p], tmp_path / "bad", ByteStandIn())
    assert not list(tmp_path.glob("bad.bin*")) and not list(tmp_path.glob(".bad*"))


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.prepare([tmp_path / "missing.txt"], tmp_path / "x", ByteStandIn())
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        data.prepare([tmp_path / "latin1.txt"], tmp_path / "x", ByteStandIn())
    with pytest.raises(DataError, match="token id 256 outside"):
        data.prepare(_write(tmp_path / "u.txt", "\u0100"), tmp_path / "x", TinyVocab())


class GreedyStandIn(ByteStandIn):
    """Greedy longest match over bytes plus a few multi-byte tokens (World's algorithm)."""

    name = "greedy-standin"
    extra = [b"ab", b"abc", b"abcd", b"\n    ", "✓✓".encode()]
    vocab_size = 256 + len(extra)

    def encode(self, text):
        self.calls += 1
        data_, out, i = text.encode(), [], 0
        while i < len(data_):
            best = next((256 + j for j, t in sorted(enumerate(self.extra), key=lambda e: -len(e[1]))
                         if data_.startswith(t, i)), data_[i])
            out.append(best)
            i += len(self.extra[best - 256]) if best >= 256 else 1
        return out

    def decode(self, ids):
        return b"".join(self.extra[i - 256] if i >= 256 else bytes([i]) for i in ids).decode(
            "utf-8", errors="replace")


@pytest.mark.parametrize("tok_cls", [ByteStandIn, CodepointStandIn, GreedyStandIn])
def test_prepare_streams_in_pieces_same_as_whole(tmp_path, monkeypatch, tok_cls):
    monkeypatch.setattr(data.text, "PIECE_CHARS", 97)
    monkeypatch.setattr(data.text, "MARGIN_CHARS", 10)
    text = "".join(f"abcd {i}\n    ab✓✓✓ abc\n" for i in range(60)) + "中文" * 200 + "\nend"
    tok = tok_cls()
    src = data.prepare(_write(tmp_path / "big.txt", text), tmp_path / "big", tok)
    want = tok_cls().encode(text)
    np.testing.assert_array_equal(src.tokens, want)
    assert tok.calls > 10  # really streamed in pieces
    assert tok.decode(src.tokens.tolist()) == text


def test_prepare_streams_with_a_non_inverting_tokenizer(tmp_path, monkeypatch):
    # decode() that does not invert encode(): the cut falls back to plain piece boundaries,
    # memory stays bounded and nothing is lost.
    class Lossy(ByteStandIn):
        def decode(self, ids):
            return "?" * len(ids)

    monkeypatch.setattr(data.text, "PIECE_CHARS", 64)
    monkeypatch.setattr(data.text, "MARGIN_CHARS", 8)
    text = "hello world\n" * 100
    src = data.prepare(_write(tmp_path / "l.txt", text), tmp_path / "l", Lossy())
    np.testing.assert_array_equal(src.tokens, list(text.encode()))


def test_read_prepared_checks_size_and_tokenizer(tmp_path):
    data.prepare(_write(tmp_path / "t.txt", "abcdef"), tmp_path / "t", ByteStandIn())
    with pytest.raises(DataError, match="tokenized with"):
        data.read_prepared(tmp_path / "t", CodepointStandIn())
    with open(tmp_path / "t.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="metadata says 6"):
        data.read_prepared(tmp_path / "t.bin")


# --- binidx ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_binidx_round_trip(tmp_path, dtype):
    docs = [[1, 2, 3], [], [4, 5], [6]]
    data.write_binidx(tmp_path / "ds", docs, dtype=dtype)
    b = data.read_binidx(tmp_path / "ds")
    assert b.tokens.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(b.tokens, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(b.sizes, [3, 0, 2, 1])
    np.testing.assert_array_equal(b.pointers, np.array([0, 3, 3, 5]) * np.dtype(dtype).itemsize)
    np.testing.assert_array_equal(b.doc_idx, [0, 1, 2, 3, 4])
    assert [b.sequence(i).tolist() for i in range(4)] == docs
    head = (tmp_path / "ds.idx").read_bytes()[:18]
    assert head[:9] == b"MMIDIDX\x00\x00" and head[9:17] == (1).to_bytes(8, "little")
    assert head[17] == {np.uint8: 1, np.int32: 4, np.uint16: 8}[dtype]
    for spelled in ("ds", "ds.bin", "ds.idx"):
        src = data.open_tokens(tmp_path / spelled)
        assert src.format == "binidx" and src.tokenizer is None
        np.testing.assert_array_equal(src.tokens, [1, 2, 3, 4, 5, 6])


def test_binidx_reads_a_hand_built_megatron_index(tmp_path):
    # Built with struct exactly as Megatron's MMapIndexedDataset.Index.writer lays it out.
    import struct
    (tmp_path / "m.bin").write_bytes(np.array([5, 6, 7, 8, 9], "<u2").tobytes())
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
           + struct.pack("<Q", 2) + struct.pack("<Q", 3)
           + np.array([2, 3], "<i4").tobytes() + np.array([0, 4], "<i8").tobytes()
           + np.array([0, 1, 2], "<i8").tobytes())
    (tmp_path / "m.idx").write_bytes(idx)
    b = data.read_binidx(tmp_path / "m")
    assert b.tokens.dtype == np.uint16 and b.tokens.tolist() == [5, 6, 7, 8, 9]
    assert b.sequence(1).tolist() == [7, 8, 9] and b.doc_idx.tolist() == [0, 1, 2]
    data.write_binidx(tmp_path / "w", [[5, 6], [7, 8, 9]])
    assert (tmp_path / "w.idx").read_bytes() == idx  # the writer produces the same bytes


def test_binidx_header_errors(tmp_path):
    data.write_binidx(tmp_path / "ds", [[1, 2, 3]])
    idx = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(b"NOTMAGIC!" + idx[9:])
    with pytest.raises(DataError, match="not a binidx index"):
        data.read_binidx(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(idx[:17] + bytes([6]) + idx[18:])
    with pytest.raises(DataError, match="floating-point"):
        data.read_binidx(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(idx[:9] + (2).to_bytes(8, "little") + idx[17:])
    with pytest.raises(DataError, match="version 2"):
        data.read_binidx(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(idx[:-4])
    with pytest.raises(DataError, match="bytes, but 1 sequences"):
        data.read_binidx(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(idx)
    (tmp_path / "ds.bin").write_bytes(b"\1\0")
    with pytest.raises(DataError, match="past the end"):
        data.read_binidx(tmp_path / "ds")
    with pytest.raises(DataError, match="cannot store"):
        data.write_binidx(tmp_path / "f", [[1]], dtype=np.float32)


def test_open_binidx_checks_ids_against_the_tokenizer(tmp_path):
    data.write_binidx(tmp_path / "ds", [[1, 300]])
    with pytest.raises(DataError, match="holds id 300"):
        data.open_tokens(tmp_path / "ds", ByteStandIn())
    src = data.open_tokens(tmp_path / "ds", CodepointStandIn())
    assert src.tokenizer.name == "codepoint-standin"


# --- open_tokens and the text cache -----------------------------------------------------------

def test_text_cache_hit_and_invalidation(tmp_path):
    p = _write(tmp_path / "c.txt", "some text\n")
    cache = tmp_path / "cache"
    first = data.open_tokens(p, ByteStandIn(), cache_dir=cache)
    np.testing.assert_array_equal(first.tokens, list(b"some text\n"))

    class Refuses(ByteStandIn):
        def encode(self, text):
            raise AssertionError("re-tokenized despite a cache entry")

    hit = data.open_tokens(p, Refuses(), cache_dir=cache)
    np.testing.assert_array_equal(hit.tokens, first.tokens)
    assert len(list(cache.glob("*.bin"))) == 1

    _write(p, "other text, longer\n")
    with pytest.raises(AssertionError, match="re-tokenized"):
        data.open_tokens(p, Refuses(), cache_dir=cache)
    np.testing.assert_array_equal(data.open_tokens(p, ByteStandIn(), cache_dir=cache).tokens,
                                  list(b"other text, longer\n"))
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, new mtime
    tok = ByteStandIn()
    data.open_tokens(p, tok, cache_dir=cache)
    assert tok.calls == 1
    # another tokenizer is another entry
    assert data.open_tokens(p, CodepointStandIn(), cache_dir=cache).tokens.dtype == np.uint32


def test_default_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c" / "tokens"
    p = _write(tmp_path / "t.txt", "abc")
    data.open_text(p, ByteStandIn())
    assert len(list((tmp_path / "c" / "tokens").glob("t-*.json"))) == 1
    monkeypatch.delenv("RWKV_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x" / "rwkv-jax" / "tokens"


def test_open_tokens_dispatch(tmp_path):
    data.prepare(_write(tmp_path / "p.txt", "xyz"), tmp_path / "p", ByteStandIn())
    for spelled in ("p", "p.bin", "p.json"):
        src = data.open_tokens(tmp_path / spelled, ByteStandIn())
        assert src.format == "prepared" and src.tokens.tolist() == [120, 121, 122]
    with pytest.raises(DataError, match="tokenized with"):
        data.open_tokens(tmp_path / "p", CodepointStandIn())
    with pytest.raises(DataError, match="no such file"):
        data.open_tokens(tmp_path / "nothing")
    (tmp_path / "lone.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="dtype is unknown"):
        data.open_tokens(tmp_path / "lone.bin")
    src = data.open_tokens(tmp_path / "p.txt", ByteStandIn(), cache_dir=tmp_path / "cache")
    assert src.format == "prepared" and src.path.parent == tmp_path / "cache"


# --- the default corpus -----------------------------------------------------------------------

def test_stdlib_corpus_deterministic_and_filtered():
    files = data.stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and "os.py" in rels and len(rels) > 100
    for rel in rels:
        parts = set(rel.split("/")[:-1])
        assert not parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}, rel
    a, b = data.stdlib_corpus(300_000), data.stdlib_corpus(300_000)
    assert a == b and 250_000 < len(a) <= 300_000
    a.decode("utf-8")
    first = next(full for _, full in files)
    assert a.startswith(first.read_bytes()[:1000])
    assert pathlib.Path(sysconfig.get_paths()["stdlib"]) in first.parents


def test_open_stdlib_corpus_is_cached(tmp_path):
    src = data.open_stdlib_corpus(ByteStandIn(), max_bytes=20_000, cache_dir=tmp_path)
    np.testing.assert_array_equal(src.tokens, list(data.stdlib_corpus(20_000)))

    class Refuses(ByteStandIn):
        def encode(self, text):
            raise AssertionError("re-tokenized")

    again = data.open_tokens(None, Refuses(), max_bytes=20_000, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.tokens, src.tokens)


# --- split, sampling, eval --------------------------------------------------------------------

def test_split_tokens():
    tokens = np.arange(1000)
    s = data.split_tokens(tokens, 0.1)
    assert len(s.train) == 900 and len(s.val) == 100 and s.val[0] == 900
    assert np.shares_memory(s.train, tokens)
    train, val = data.split_tokens(tokens, 0.0)
    assert len(train) == 1000 and len(val) == 0
    with pytest.raises(DataError):
        data.split_tokens(tokens, 1.0)


def _starts(x):
    return x[:, 0].astype(np.int64)


def test_sample_batch_depends_only_on_seed_and_step():
    n, T, B = 5000, 16, 8
    tokens = np.arange(n, dtype=np.uint16)  # a window's content is its start offset
    x, y = data.sample_batch(tokens, step=3, batch_size=B, ctx_len=T, seed=0)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, _starts(x)[:, None] + np.arange(T))  # contiguous windows
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
    x2, y2 = data.sample_batch(tokens, step=3, batch_size=B, ctx_len=T, seed=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = data.sample_batch(tokens, step=4, batch_size=B, ctx_len=T, seed=0)
    x4, _ = data.sample_batch(tokens, step=3, batch_size=B, ctx_len=T, seed=1)
    assert not np.array_equal(x, x3) and not np.array_equal(x, x4)
    # hosts read only their own rows, which concatenate to the single-host batch
    parts = [data.sample_batch(tokens, step=3, batch_size=B, ctx_len=T, seed=0, host_index=h,
                               host_count=4) for h in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    # starts span the whole valid range [0, n - T - 1], roughly uniformly
    starts = np.concatenate([_starts(data.sample_batch(tokens, step=s, batch_size=B, ctx_len=T,
                                                       seed=0)[0]) for s in range(500)])
    assert starts.min() >= 0 and starts.max() <= n - T - 1
    counts = np.histogram(starts, bins=10, range=(0, n - T))[0]
    assert counts.min() > 0.8 * counts.mean()


def test_sample_batch_argument_errors():
    tokens = np.arange(100)
    with pytest.raises(DataError, match="divisible"):
        data.sample_batch(tokens, step=0, batch_size=6, ctx_len=4, seed=0, host_count=4)
    with pytest.raises(DataError, match="fewer than one window"):
        data.sample_batch(tokens, step=0, batch_size=1, ctx_len=100, seed=0)
    with pytest.raises(DataError, match="unknown sampler"):
        data.sample_batch(tokens, step=0, batch_size=1, ctx_len=4, seed=0, sampler="nope")


def test_magic_prime_matches_rwkv_lm():
    # RWKV-LM's MiniPile demo: 1498226207 tokens, ctx 512 -> --magic_prime 2926181
    assert data.magic_prime(1498226207, 512) == 2926181
    for n, ctx in [(10_000, 16), (4097, 64), (123_457, 100)]:
        p = data.magic_prime(n, ctx)
        assert p % 3 == 2 and data.is_prime(p) and p < n / ctx - 1
        assert not any(data.is_prime(q) for q in range(p + 3, int(n / ctx - 1) + 1, 3)
                       if q < n / ctx - 1)
    with pytest.raises(DataError, match="too few windows"):
        data.magic_prime(40, 16)


def test_magic_prime_sampler_is_a_permutation():
    n, T, B = 3000, 16, 4
    p = data.magic_prime(n, T)  # 3000/16 - 1 = 186.5 -> 179
    assert p == 179
    tokens = np.arange(n, dtype=np.uint16)
    starts = []
    for step in range(-(-2 * p // B)):  # two epochs
        x, y = data.sample_batch(tokens, step=step, batch_size=B, ctx_len=T, seed=0,
                                 sampler="magic_prime")
        np.testing.assert_array_equal(y, x + 1)
        starts.extend(_starts(x).tolist())
    epoch = starts[:p]
    assert sorted(epoch) == [k * T for k in range(p)]  # every window exactly once per epoch
    assert starts[p:2 * p] == epoch  # and the next epoch repeats the order
    assert max(epoch) + T + 1 <= n
    # host slices concatenate to the single-host batch here too
    full = data.sample_batch(tokens, step=5, batch_size=B, ctx_len=T, seed=0, sampler="magic_prime")
    halves = [data.sample_batch(tokens, step=5, batch_size=B, ctx_len=T, seed=0,
                                sampler="magic_prime", host_index=h, host_count=2)[0]
              for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), full[0])


@pytest.mark.parametrize("n", [1, 2, 17, 96, 97, 1000])
def test_eval_batches_cover_every_token_once(n):
    tokens = np.arange(n, dtype=np.uint16) % 251
    B, T = 3, 16
    batches = list(data.eval_batches(tokens, batch_size=B, ctx_len=T))
    assert len(batches) == data.count_eval_batches(n, batch_size=B, ctx_len=T)
    for b in batches:
        assert b.x.shape == b.y.shape == b.mask.shape == (B, T) and b.mask.dtype == np.bool_
    ys = np.concatenate([b.y[b.mask] for b in batches]) if batches else np.zeros(0)
    xs = np.concatenate([b.x[b.mask] for b in batches]) if batches else np.zeros(0)
    np.testing.assert_array_equal(ys, tokens[1:])  # every target exactly once, in order
    np.testing.assert_array_equal(xs, tokens[:-1])
    for b in batches:  # unmasked positions are padding with id 0
        assert not b.x[~b.mask].any() and not b.y[~b.mask].any()
    limited = list(data.eval_batches(tokens, batch_size=B, ctx_len=T, max_batches=1))
    assert len(limited) == min(1, len(batches))


def test_count_utf8_bytes():
    text = "héllo ✓" * 50
    ids = np.asarray(list(text.encode()), np.uint16)
    assert data.count_utf8_bytes(ids, ByteStandIn()) == len(text.encode())


def test_with_real_tokenizers_when_present(tmp_path):
    tokenizers = pytest.importorskip("rwkv_jax.tokenizers")
    p = _write(tmp_path / "r.txt", "hello world\nhello\n")
    src = data.open_tokens(p, "bytes", cache_dir=tmp_path / "c")
    assert src.tokenizer is not None and src.tokenizer.decode(src.tokens.tolist()) == p.read_text()
    again = data.open_tokens(p, "bytes", cache_dir=tmp_path / "c")  # rebuilt from the stored spec
    assert again.tokenizer.to_dict() == src.tokenizer.to_dict()
    char = data.open_tokens(p, "char", cache_dir=tmp_path / "c")
    assert char.tokenizer.decode(char.tokens.tolist()) == p.read_text()
    assert char.tokenizer.vocab_size <= 16
    tok = tokenizers.ByteTokenizer()
    prepared = data.prepare([p], tmp_path / "pp", tok)
    assert data.read_prepared(tmp_path / "pp").tokenizer.to_dict() == tok.to_dict()
    np.testing.assert_array_equal(prepared.tokens, src.tokens)


# --- split errors, documents, tokenizer specs -------------------------------------------------

def test_split_errors_name_the_config_keys_and_counts():
    tokens = np.arange(1000)
    train, val = data.split_tokens(tokens, 0.0, ctx_len=128)  # no validation is allowed
    assert len(train) == 1000 and len(val) == 0
    assert list(data.eval_batches(val, batch_size=2, ctx_len=128)) == []
    with pytest.raises(DataError, match=r"data\.ctx_len=1000 needs at least 1001 training "
                                        r"tokens, but the training split has 900 \(of 1000 "
                                        r"tokens with data\.val_fraction=0\.1\)"):
        data.split_tokens(tokens, 0.1, ctx_len=1000)
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.001 leaves 1 validation "
                                        r"token\(s\) of 1000.*set it to 0"):
        data.split_tokens(tokens, 0.001, ctx_len=16)
    with pytest.raises(DataError, match=r"data\.val_fraction must be in \[0, 1\), got 1\.0"):
        data.split_tokens(tokens, 1.0)
    with pytest.raises(DataError, match=r"data\.ctx_len=1000 needs"):
        data.split_source(data.TokenSource(tokens), 0.1, ctx_len=1000)


def test_prepared_documents_index(tmp_path):
    lines = [json.dumps({"text": t}) for t in ("ab", "", "cde")]
    p = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    src = data.prepare([p], tmp_path / "d", ByteStandIn(), doc_separator=9)
    assert src.doc_offsets.tolist() == [0, 3, 4, 8]
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["docs"] == {"file": "d.docs.bin", "dtype": "int64", "n_docs": 3}
    assert np.fromfile(tmp_path / "d.docs.bin", "<i8").tolist() == [0, 3, 4, 8]
    assert data.read_prepared(tmp_path / "d").doc_offsets.tolist() == [0, 3, 4, 8]
    good = (tmp_path / "d.docs.bin").read_bytes()
    (tmp_path / "d.docs.bin").write_bytes(good[:-8])
    with pytest.raises(DataError, match=r"d\.docs\.bin: 24 bytes"):
        data.read_prepared(tmp_path / "d")
    (tmp_path / "d.docs.bin").write_bytes(np.asarray([0, 4, 3, 8], "<i8").tobytes())
    with pytest.raises(DataError, match="offsets do not run from 0 to 8 in order"):
        data.read_prepared(tmp_path / "d")
    # re-preparing as a single text file drops the now stale index
    data.prepare(_write(tmp_path / "one.txt", "abc"), tmp_path / "d", ByteStandIn())
    assert not (tmp_path / "d.docs.bin").exists()
    assert data.read_prepared(tmp_path / "d").doc_offsets.tolist() == [0, 3]


def test_prepare_rejects_a_torn_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "cut of')
    with pytest.raises(data.TornLineError, match=r"t\.jsonl:2: incomplete last line"):
        data.prepare([p], tmp_path / "t", ByteStandIn())


def test_binidx_documents_need_back_to_back_sequences(tmp_path):
    data.write_binidx(tmp_path / "ds", [[1, 2], [3, 4, 5]])
    assert data.read_binidx(tmp_path / "ds").doc_offsets().tolist() == [0, 2, 5]
    idx = bytearray((tmp_path / "ds.idx").read_bytes())
    # point the second sequence at byte 0: valid for reading sequences, not for documents
    idx[34 + 8 + 8:34 + 8 + 16] = (0).to_bytes(8, "little")
    (tmp_path / "ds.idx").write_bytes(bytes(idx))
    b = data.read_binidx(tmp_path / "ds")
    assert b.sequence(1).tolist() == [1, 2, 3] and b.doc_offsets() is None
    assert data.document_offsets(data.open_tokens(tmp_path / "ds")).tolist() == [0, 5]


def test_a_run_directory_tokenizer_trains_data(tmp_path):
    tokenizers = pytest.importorskip("rwkv_jax.tokenizers")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    char = tokenizers.CharTokenizer("abc\n ")
    (run / "tokenizer.json").write_text(json.dumps(char.to_dict()))  # as training writes it
    p = _write(tmp_path / "t.txt", "cab ba\n")
    for spec in (str(run / "tokenizer.json"), str(run), run):
        src = data.open_tokens(p, spec, cache_dir=tmp_path / "c")
        assert src.tokenizer.to_dict() == char.to_dict()
        assert src.tokens.tolist() == char.encode("cab ba\n")
    # the cache key follows the file a run directory names
    (run / "tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    assert data.open_tokens(p, str(run), cache_dir=tmp_path / "c").tokens.tolist() == list(
        b"cab ba\n")
    (run / "tokenizer.json").write_text("{broken")
    with pytest.raises(tokenizers.TokenizerError, match=r"x/tokenizer\.json: not a readable"):
        data.open_tokens(p, str(run), cache_dir=tmp_path / "c2")
