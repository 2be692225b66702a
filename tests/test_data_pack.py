"""Packed rows of whole documents: contents, boundaries and masks against the source file,
determinism per (seed, step, row), host splitting and the document sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import Batch, DataError, TokenSource, chat
from rwkv_jax.tokenizers import ByteTokenizer, WorldTokenizer

T = 8
SEP = 0


def _docs_texts():
    # lengths (with the separator) around the piece size T + 1 = 9: 1-token documents, exact
    # fits, one over, several pieces, and ordinary short ones
    return ["", "a", "abcdefg", "abcdefgh", "0123456789abcdefghijklmn", "xy",
            "The quick brown fox", "pq", "r", "abcdefghijklmnop", "stu"]


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs_texts()),
                 encoding="utf-8")
    src = data.prepare([p], tmp_path / "docs", ByteTokenizer(), doc_separator=SEP)
    docs = [list(t.encode()) + [SEP] for t in _docs_texts()]  # what the file holds, per doc
    return src, docs


def _pieces_of(doc: list[int]) -> list[list[int]]:
    """The packing rule, written out plainly: <= T+1 tokens, overlapping by one."""
    if len(doc) <= T + 1:
        return [doc]
    out, k = [], 0
    while k * T < len(doc) - 1:
        out.append(doc[k * T:k * T + T + 1])
        k += 1
    return out


def _segments(b: Batch, i: int) -> list[list[int]]:
    """Read the pieces back from one row using only (x, y, resets, mask)."""
    x, y, resets, mask = b.x[i], b.y[i], b.resets[i], b.mask[i]
    T = x.shape[0]  # noqa: N806
    starts = np.flatnonzero(resets).tolist()
    out = []
    for k, s in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else T
        n_pairs = int(mask[s:stop].sum())
        assert mask[s:s + n_pairs].all() and not mask[s + n_pairs:stop].any()
        out.append(x[s:s + 1].tolist() if n_pairs == 0 else
                   x[s:s + n_pairs].tolist() + [int(y[s + n_pairs - 1])])
        if k + 1 < len(starts):
            assert s + n_pairs + 1 == stop  # the next piece starts right after this one
    end = starts[-1] + len(out[-1]) if starts else 0  # first padding position in w[0..T]
    w = np.concatenate([x, y[-1:]])
    assert not w[end:].any() and not resets[end:].any() and not mask[max(end - 1, 0):].any()
    return out


def test_rows_hold_exactly_the_file_documents(corpus):
    src, docs = corpus
    packing = data.pack_documents(src, T)
    assert src.doc_offsets.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    pieces, sizes = [], []
    for r in range(packing.n_rows):
        b = packing.row(r)
        assert b.x.shape == b.y.shape == b.resets.shape == b.mask.shape == (1, T)
        assert b.x.dtype == b.y.dtype == np.int32 and b.resets.dtype == np.bool_
        assert b.mask.dtype == np.float32 and b.resets[0, 0]
        row = _segments(b, 0)
        assert sum(map(len, row)) <= T + 1
        pieces += row
        sizes.append(sum(map(len, row)))
    want = [p for d in docs for p in _pieces_of(d)]
    assert pieces == want  # every piece once, in file order, nothing else
    # next-fit: each row was closed because the next piece did not fit
    first = np.cumsum([0] + [len(_segments(packing.row(r), 0)) for r in range(packing.n_rows)])
    for r in range(packing.n_rows - 1):
        assert sizes[r] + len(want[first[r + 1]]) > T + 1
    # joining each document's pieces (they overlap by one token) gives the document back
    rebuilt, i = [], 0
    for d in docs:
        ps = _pieces_of(d)
        got = pieces[i:i + len(ps)]
        rebuilt.append(got[0] + [t for p in got[1:] for t in p[1:]])
        i += len(ps)
    assert rebuilt == docs
    # every (input, target) pair inside a document is trained exactly once
    assert sum(packing.row(r).mask.sum() for r in range(packing.n_rows)) == sum(
        len(d) - 1 for d in docs)


def test_the_chat_loss_mask_carries_into_packed_rows(tmp_path):
    world = WorldTokenizer()
    recs = [{"prompt": f"question {i}?", "response": "answer " * (i % 4) + "done."}
            for i in range(12)] + [{"text": "a plain document"}]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    src = data.prepare([p], tmp_path / "chat", world, loss_on="response")
    T_ = 12  # short rows: some conversations are split into pieces
    packing = data.pack_documents(src, T_)
    targets = []
    for r in range(packing.n_rows):
        b = packing.row(r)
        targets += b.y[0][b.mask[0] > 0].tolist()
        assert set(np.unique(b.mask)) <= {0.0, 1.0}
    bodies = "".join(chat.turn_parts("assistant", r["response"])[1] for r in recs if
                     "response" in r)
    text = world.encode(recs[-1]["text"])
    # trained targets, in row order: every reply (with its "\n\n"), the text document's tokens
    # after its first, and its separator; never a prompt, a role prefix or a chat separator
    assert world.decode(targets) == bodies + world.decode(text[1:])
    assert targets[-1] == 0 and len(targets) == (sum(
        len(world.encode(chat.turn_parts("assistant", r["response"])[1])) for r in recs[:-1])
        + len(text))


def test_determinism_per_seed_step_row_and_host_split(corpus, tmp_path):
    src, _ = corpus
    kw = dict(batch_size=8, ctx_len=T, seed=3)
    a = data.sample_packed_batch(src, step=5, **kw)
    b = data.sample_batch(src, step=5, pack=True, **kw)
    assert isinstance(a, Batch) and a.x.shape == (8, T)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # a fresh process-like reopen (new objects, no cache) draws the same rows: exact resume
    again = data.pack_documents(data.read_prepared(tmp_path / "docs"), T)
    for u, v in zip(a, again.batch(step=5, batch_size=8, seed=3)):
        np.testing.assert_array_equal(u, v)
    c = data.sample_packed_batch(src, step=6, **kw)
    d = data.sample_packed_batch(src, step=5, **{**kw, "seed": 4})
    assert not np.array_equal(a.x, c.x) and not np.array_equal(a.x, d.x)
    for hosts in (2, 4):
        parts = [data.sample_packed_batch(src, step=5, host_index=h, host_count=hosts, **kw)
                 for h in range(hosts)]
        for field in range(4):
            np.testing.assert_array_equal(np.concatenate([q[field] for q in parts]), a[field])
    # row g is packed row choose(seed, step, g), whatever batch it belongs to
    packing = data.pack_documents(src, T)
    rows = data.order.choose("random", packing.n_rows, seed=3, step=5, rows=np.arange(8),
                             batch_size=8)
    np.testing.assert_array_equal(packing.rows(rows).x, a.x)
    with pytest.raises(DataError, match="divisible"):
        data.sample_packed_batch(src, step=0, host_count=3, **kw)


def test_magic_prime_visits_every_packed_row_once_per_prime(corpus):
    src, _ = corpus
    packing = data.pack_documents(src, T)
    p = data.order.largest_magic_prime(packing.n_rows + 1)
    assert p is not None and p <= packing.n_rows and p % 3 == 2
    B = 2
    chosen = np.concatenate([data.order.choose("magic_prime", packing.n_rows, seed=0, step=s,
                                               rows=np.arange(B), batch_size=B)
                             for s in range(-(-2 * p // B))])
    assert sorted(chosen[:p].tolist()) == list(range(p))  # each row once per p samples
    np.testing.assert_array_equal(chosen[p:2 * p], chosen[:p])
    for step in range(3):
        b = packing.batch(step=step, batch_size=B, seed=0, sampler="magic_prime")
        want = packing.rows(chosen[step * B:(step + 1) * B])
        for u, v in zip(b, want):
            np.testing.assert_array_equal(u, v)


def test_document_sources(tmp_path):
    # binidx: the .idx documents
    data.write_binidx(tmp_path / "bi", [[5, 6, 7], [], [8, 9], [1]])
    src = data.open_tokens(tmp_path / "bi")
    assert src.doc_offsets.tolist() == [0, 3, 3, 5, 6]
    packing = data.pack_documents(src, 4)
    assert [s for r in range(packing.n_rows) for s in _segments(packing.row(r), 0)] == [
        [5, 6, 7], [8, 9], [1]]
    # an array with a known separator: documents end after each separator id
    arr = TokenSource(np.asarray([3, 4, 0, 5, 0, 6], np.uint16), doc_separator=0)
    assert data.document_offsets(arr).tolist() == [0, 3, 5, 6]
    assert data.document_offsets(TokenSource(np.arange(5))).tolist() == [0, 5]
    # text files: one document each (the offsets follow from the sources, no index file)
    for name, text in (("a.txt", "first"), ("b.txt", "second doc")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    pre = data.prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "ab",
                       ByteTokenizer())
    assert pre.doc_offsets.tolist() == [0, 5, 15] and not (tmp_path / "ab.docs.bin").exists()
    assert data.read_prepared(tmp_path / "ab").doc_offsets.tolist() == [0, 5, 15]
    # the stdlib corpus: one document per file
    std = data.open_stdlib_corpus("bytes", max_bytes=30_000, cache_dir=tmp_path / "c")
    docs = data.stdlib_documents(30_000)
    assert np.diff(std.doc_offsets).tolist() == [len(d) for d in docs] and len(docs) > 1


def test_split_source_cuts_documents_and_keeps_masks(corpus):
    src, docs = corpus
    s = data.split_source(src, 0.25)
    n_train = int(len(src) * 0.75)
    assert len(s.train) == n_train and len(s.val) == len(src) - n_train
    off = src.doc_offsets
    assert s.train.doc_offsets.tolist() == [*off[off < n_train].tolist(), n_train]
    assert s.val.doc_offsets.tolist() == [0, *(off[off > n_train] - n_train).tolist()]
    np.testing.assert_array_equal(np.concatenate([s.train.tokens, s.val.tokens]), src.tokens)
    masked = TokenSource(np.arange(10), mask=np.arange(10) % 2, doc_offsets=np.asarray([0, 10]))
    m = data.split_source(masked, 0.3)
    assert m.train.mask.tolist() == [0, 1, 0, 1, 0, 1, 0] and m.val.mask.tolist() == [1, 0, 1]


def test_unpacked_source_batches_carry_the_mask(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    mask = (np.arange(100) % 3 == 0).astype(np.uint8)
    src = TokenSource(tokens, mask=mask)
    b = data.sample_batch(src, step=2, batch_size=4, ctx_len=T, seed=1)
    x, y = data.sample_batch(tokens, step=2, batch_size=4, ctx_len=T, seed=1)
    np.testing.assert_array_equal(b.x, x)
    np.testing.assert_array_equal(b.y, y)
    np.testing.assert_array_equal(b.mask, (b.y % 3 == 0).astype(np.float32))  # target's mask
    assert b.resets[:, 0].all() and not b.resets[:, 1:].any()
    plain = data.sample_batch(TokenSource(tokens), step=2, batch_size=4, ctx_len=T, seed=1)
    assert plain.mask.all()
    with pytest.raises(DataError, match="pack=True needs a TokenSource"):
        data.sample_batch(tokens, step=0, batch_size=1, ctx_len=T, seed=0, pack=True)
    # evaluation windows honour the mask too
    ev = list(data.eval_batches(src, batch_size=2, ctx_len=T))
    ys = np.concatenate([e.y[e.mask] for e in ev])
    np.testing.assert_array_equal(ys, tokens[1:][mask[1:] > 0])
