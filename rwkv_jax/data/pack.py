"""Packed training rows: whole documents side by side, with state resets and a loss mask.

Every document is cut into *pieces* of at most ``ctx_len + 1`` tokens: a document that fits
is one piece; a longer one is cut at multiples of ``ctx_len`` into pieces that overlap by one
token (piece ``k`` is ``doc[k·T : k·T + T + 1]``), so every (input, target) pair inside the
document is in exactly one piece. Pieces are then grouped, in file order, into *rows* of at
most ``T + 1`` tokens (next-fit: a row takes pieces while the next one fits). This grouping is
a function of the data and ``ctx_len`` only; which row a training sample draws is a function of
``(seed, step, row)`` (:mod:`rwkv_jax.data.order`), so resume is exact and every host draws
only its own rows, as for :func:`rwkv_jax.data.sample_batch`.

A row of tokens ``w[0..T]`` gives ``x = w[:-1]``, ``y = w[1:]`` and

* ``resets[j]``: True where ``x[j]`` starts a piece (position 0 always): the recurrent state
  must start from zero there, as at the start of a document;
* ``mask[j]``: 1.0 where ``(x[j], y[j])`` is a pair inside one piece, times the data's own
  loss mask of the target (chat ``loss_on="response"``); 0.0 for the pair from a piece's last
  token to the next piece's first token and for the padding (id 0) at the end of the row.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import numpy as np

from rwkv_jax.data import order
from rwkv_jax.data.files import DataError
from rwkv_jax.data.formats import TokenSource

__all__ = ["Batch", "Packing", "document_offsets", "pack_documents", "sample_packed_batch"]

# Separator search reads the tokens in chunks of this many ids (bounded memory).
_SCAN_CHUNK = 1 << 24


class Batch(NamedTuple):
    """One batch of rows: ``x``, ``y`` ``[B, T]`` int32; ``resets`` ``[B, T]`` bool (True where
    the state starts from zero before ``x[:, j]``); ``mask`` ``[B, T]`` float32 (weight of the
    loss on ``y[:, j]``; average the loss over it)."""

    x: np.ndarray
    y: np.ndarray
    resets: np.ndarray
    mask: np.ndarray


def document_offsets(source: TokenSource) -> np.ndarray:
    """Document offsets ``[n_docs + 1]`` (int64, 0 .. N) of ``source``.

    The recorded ``doc_offsets`` (prepared files, binidx) when present; else the documents
    end after each ``doc_separator`` id when that is known; else the whole source is one
    document.
    """
    n = len(source)
    if source.doc_offsets is not None:
        return np.asarray(source.doc_offsets, np.int64)
    if source.doc_separator is None:
        return np.asarray([0, n], np.int64)
    ends = [np.flatnonzero(np.asarray(source.tokens[i:i + _SCAN_CHUNK]) == source.doc_separator)
            + (i + 1) for i in range(0, n, _SCAN_CHUNK)]
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    tail = [] if ends.size and int(ends[-1]) == n else [n]
    return np.concatenate([[0], ends, tail]).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class Packing:
    """The pieces of a source's documents grouped into rows (see the module docstring).

    Attributes:
      source: the tokens (and mask) the rows are read from.
      ctx_len: ``T``; a row holds at most ``T + 1`` tokens.
      piece_start: int64 ``[n_pieces]``, token index of each piece in ``source``.
      piece_len: int64 ``[n_pieces]``, 1 .. T + 1.
      row_first: int64 ``[n_rows + 1]``, row ``r`` holds pieces
        ``row_first[r] .. row_first[r+1] - 1``.
    """

    source: TokenSource
    ctx_len: int
    piece_start: np.ndarray
    piece_len: np.ndarray
    row_first: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.row_first.shape[0]) - 1

    def row(self, r: int) -> Batch:
        """Row ``r`` as a batch of one (``[1, T]`` arrays)."""
        return self.rows(np.asarray([r]))

    def rows(self, indices: np.ndarray) -> Batch:
        """The rows ``indices`` (any order, repeats allowed) as a :class:`Batch`."""
        T = self.ctx_len
        B = len(indices)
        x = np.zeros((B, T), np.int32)
        y = np.zeros((B, T), np.int32)
        resets = np.zeros((B, T), np.bool_)
        mask = np.zeros((B, T), np.float32)
        tokens, loss_mask = self.source.tokens, self.source.mask
        for b, r in enumerate(np.asarray(indices, np.int64).tolist()):
            if not 0 <= r < self.n_rows:
                raise DataError(f"row {r} not in [0, {self.n_rows})")
            a, e = int(self.row_first[r]), int(self.row_first[r + 1])
            lens, starts = self.piece_len[a:e], self.piece_start[a:e]
            pos = np.cumsum(lens) - lens  # where each piece starts in the row
            total = int(lens.sum())
            gidx = np.repeat(starts - pos, lens) + np.arange(total)  # token index per position
            w = np.zeros(T + 1, np.int32)
            w[:total] = np.asarray(tokens[gidx])
            x[b], y[b] = w[:-1], w[1:]
            resets[b, pos[pos < T]] = True
            piece = np.repeat(np.arange(e - a), lens)
            pair = (piece[:-1] == piece[1:]).astype(np.float32)  # inside one piece
            if loss_mask is not None:
                pair *= np.asarray(loss_mask[gidx[1:]], np.float32)
            mask[b, :total - 1] = pair
        return Batch(x, y, resets, mask)

    def batch(self, *, step: int, batch_size: int, seed: int, host_index: int = 0,
              host_count: int = 1, sampler: str = "random") -> Batch:
        """This host's rows of the global batch for ``step``, ``[B_local, T]`` each (the
        contract of :func:`rwkv_jax.data.sample_batch`): global row ``g`` draws packed row
        ``choose(sampler, n_rows, seed, step, g)``."""
        rows = order.host_rows(step=step, batch_size=batch_size, ctx_len=self.ctx_len,
                               seed=seed, host_index=host_index, host_count=host_count)
        if self.n_rows == 0:
            raise DataError("no packed rows: the data holds no tokens")
        return self.rows(order.choose(sampler, self.n_rows, seed=seed, step=step, rows=rows,
                                      batch_size=batch_size))


def _build(source: TokenSource, ctx_len: int) -> Packing:
    if ctx_len <= 0:
        raise DataError(f"ctx_len must be positive, got {ctx_len}")
    T = ctx_len
    off = document_offsets(source)
    starts, lens = off[:-1], np.diff(off)
    keep = lens > 0
    starts, lens = starts[keep], lens[keep]
    n_pieces = np.where(lens <= T + 1, 1, (lens - 2) // T + 1)  # ceil((L - 1) / T), at least 1
    doc = np.repeat(np.arange(lens.size), n_pieces)
    k = np.arange(int(n_pieces.sum())) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    piece_start = (starts[doc] + k * T).astype(np.int64)
    piece_len = np.minimum(T + 1, lens[doc] - k * T).astype(np.int64)
    # Next-fit: the row that starts at piece i ends before piece nxt[i], the first piece that
    # would overflow T + 1 tokens (nxt[i] > i since every piece fits alone).
    cum = np.concatenate([[0], np.cumsum(piece_len)])
    nxt = (np.searchsorted(cum, cum[:-1] + T + 1, side="right") - 1).tolist()
    first, i, n = [], 0, len(nxt)
    while i < n:
        first.append(i)
        i = nxt[i]
    first.append(n)
    return Packing(source, T, piece_start, piece_len, np.asarray(first, np.int64))


# Packings of recently used sources, so a training loop can pass the same source every step.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 8


def pack_documents(source: TokenSource, ctx_len: int) -> Packing:
    """The :class:`Packing` of ``source`` for ``ctx_len`` (remembered for the last few sources,
    keyed by identity)."""
    key = (id(source), ctx_len)
    hit = _CACHE.get(key)
    if hit is not None and hit.source is source:
        _CACHE.move_to_end(key)
        return hit
    packing = _build(source, ctx_len)
    _CACHE[key] = packing  # holds the source, so its id cannot be reused while cached
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return packing


def sample_packed_batch(source: TokenSource | Packing, *, step: int, batch_size: int,
                        ctx_len: int, seed: int, host_index: int = 0, host_count: int = 1,
                        sampler: str = "random") -> Batch:
    """This host's packed rows for ``step``: :meth:`Packing.batch` of
    :func:`pack_documents` ``(source, ctx_len)``."""
    if isinstance(source, Packing):
        if source.ctx_len != ctx_len:
            raise DataError(f"the packing was built for ctx_len={source.ctx_len}, not {ctx_len}")
        packing = source
    else:
        packing = pack_documents(source, ctx_len)
    return packing.batch(step=step, batch_size=batch_size, seed=seed, host_index=host_index,
                         host_count=host_count, sampler=sampler)
