"""Token files on disk and the :class:`TokenSource` every reader returns.

* **prepared** (``name.bin`` + ``name.json``), written by :func:`write_prepared` (through
  :func:`rwkv_jax.data.prepare`): raw little-endian ids, ``uint16`` when
  ``vocab_size <= 65536`` else ``uint32``, and JSON metadata (dtype, token count,
  ``tokenizer.to_dict()``, document separator, sources). Optional companions, each named in
  the ``.json``:

  - ``name.mask.bin``: one ``uint8`` per token, 1 where the token is a training target
    (chat data with ``loss_on="response"``); key ``"mask"``.
  - ``name.docs.bin``: little-endian ``int64`` document offsets ``[n_docs + 1]`` (document
    ``i`` is ``tokens[off[i]:off[i+1]]``, its separator included); key ``"docs"``. Written
    only when a source holds several documents (a ``.jsonl``, the stdlib corpus); otherwise
    each source is one document and the offsets follow from the sources' token counts.

  The ``.json`` is written last: a reader that finds it knows the rest is complete.
* **binidx** (``name.bin`` + ``name.idx``): the Megatron ``MMapIndexedDataset`` that RWKV-LM
  trains from. The tokens are the ``.bin`` viewed as the index's dtype (the documents back to
  back); document boundaries come from the index.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rwkv_jax.data.files import (DataError, PathLike, as_json, memmap_or_empty, strip_suffix,
                                 temp_path, with_suffix, write_json_atomic)
from rwkv_jax.tokenizers import TokenizerError, tokenizer_from_dict

if TYPE_CHECKING:
    from rwkv_jax.tokenizers import Tokenizer

__all__ = ["TokenSource", "token_dtype", "TokenWriter", "write_prepared", "read_prepared",
           "PREPARED_FORMAT", "PREPARED_VERSION", "BinIdx", "write_binidx", "read_binidx",
           "BINIDX_MAGIC"]

PREPARED_FORMAT = "rwkv-jax-tokens"
PREPARED_VERSION = 1  # the mask and docs companions are optional keys, readable by version 1
# Token buffer flushed to disk at this many ids.
FLUSH_TOKENS = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """A 1-D token array (usually a read-only memmap) and what is known about it.

    Attributes:
      tokens: ``[N]`` integer token ids.
      tokenizer: the tokenizer that produced them, when known and loadable.
      tokenizer_spec: the stored ``tokenizer.to_dict()`` (prepared files), even when the
        tokenizer itself could not be rebuilt.
      path: the file the tokens are read from.
      format: ``"prepared"``, ``"binidx"`` or ``"memory"``.
      mask: ``[N]`` uint8 or None; 1 where the token is a training target (loss), 0 where it
        is context only (chat prompts with ``loss_on="response"``). None: every token is.
      doc_offsets: ``[n_docs + 1]`` int64 or None, non-decreasing from 0 to N: document ``i``
        is ``tokens[doc_offsets[i]:doc_offsets[i+1]]`` (its trailing separator included).
        None: not recorded (see :func:`rwkv_jax.data.document_offsets` for the fallback).
      doc_separator: the id appended after every document, when known.
    """

    tokens: np.ndarray
    tokenizer: Tokenizer | None = None
    tokenizer_spec: dict | None = None
    path: pathlib.Path | None = None
    format: str = "memory"
    mask: np.ndarray | None = None
    doc_offsets: np.ndarray | None = None
    doc_separator: int | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def slice(self, start: int, stop: int) -> TokenSource:
        """Tokens ``[start, stop)`` as a source of their own (views, no copy); a document cut
        by either end becomes a shorter document."""
        n = len(self)
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        stop = max(start, stop)
        offsets = None
        if self.doc_offsets is not None:
            off = np.asarray(self.doc_offsets, np.int64)
            inner = off[(off > start) & (off < stop)] - start
            offsets = np.concatenate([[0], inner, [stop - start]]).astype(np.int64)
        mask = None if self.mask is None else self.mask[start:stop]
        return dataclasses.replace(self, tokens=self.tokens[start:stop], mask=mask,
                                   doc_offsets=offsets)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


# ---------------------------------------------------------------------------------------------
# prepared: writing
# ---------------------------------------------------------------------------------------------

class TokenWriter:
    """Buffers token ids (and, with a mask file, their loss mask), checks their range, appends
    them to the binary file(s) and records where each document ends.

    ``count`` is the number of ids accepted so far; ``doc_ends`` the ``count`` at each
    :meth:`end_document`.
    """

    def __init__(self, f, dtype: np.dtype, vocab_size: int, mask_file=None):
        self.f, self.dtype, self.vocab_size, self.mask_file = f, dtype, vocab_size, mask_file
        self.parts: list[np.ndarray] = []
        self.mask_parts: list[np.ndarray] = []
        self.pending = 0
        self.count = 0
        self.doc_ends = array.array("q")

    @property
    def has_mask(self) -> bool:
        return self.mask_file is not None

    def extend(self, ids: Sequence[int], where: str, mask: int | Sequence[int] = 1) -> None:
        """Append ``ids``; ``mask`` (0/1, one value or one per id) is kept when the writer
        has a mask file and ignored otherwise. ``where`` names the input in errors."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"{where}: token id {lo if lo < 0 else hi} outside "
                                f"[0, {self.vocab_size}) of the tokenizer")
        self.parts.append(arr.astype(self.dtype))
        if self.mask_file is not None:
            m = np.asarray(mask, np.uint8).reshape(-1)
            if m.size == 1:
                m = np.full(arr.size, m[0], np.uint8)
            if m.size != arr.size:
                raise DataError(f"{where}: {m.size} mask values for {arr.size} tokens")
            self.mask_parts.append(m)
        self.pending += arr.size
        self.count += arr.size
        if self.pending >= FLUSH_TOKENS:
            self.flush()

    def end_document(self) -> None:
        """Mark the end of a document at the current position."""
        self.doc_ends.append(self.count)

    def flush(self) -> None:
        for part in self.parts:
            part.tofile(self.f)
        for part in self.mask_parts:
            part.tofile(self.mask_file)
        self.parts, self.mask_parts, self.pending = [], [], 0

    def offsets(self) -> np.ndarray:
        """Document offsets ``[n_docs + 1]``; ids after the last :meth:`end_document` form a
        last document."""
        ends = np.asarray(self.doc_ends, np.int64)
        tail = [] if ends.size and int(ends[-1]) == self.count else [self.count]
        return np.concatenate([[0], ends, tail]).astype(np.int64)


def write_prepared(out_prefix: PathLike, tokenizer: Tokenizer, doc_separator: int | None,
                   fill: Callable[[TokenWriter], list[dict]], *,
                   loss_on: str | None = None) -> TokenSource:
    """Create ``out_prefix.bin``/``.json`` (and companions) atomically.

    ``fill(writer)`` writes the ids, ends each document and returns the sources' metadata
    (dicts with at least ``n_docs`` and ``n_tokens``). With ``loss_on`` (e.g. ``"response"``)
    the writer keeps a mask, saved as ``out_prefix.mask.bin``.
    """
    prefix = pathlib.Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, json_path = with_suffix(prefix, ".bin"), with_suffix(prefix, ".json")
    mask_path, docs_path = with_suffix(prefix, ".mask.bin"), with_suffix(prefix, ".docs.bin")
    dtype = token_dtype(tokenizer.vocab_size)
    if doc_separator is not None and not 0 <= doc_separator < tokenizer.vocab_size:
        raise DataError(f"doc_separator {doc_separator} outside [0, {tokenizer.vocab_size})")
    tmps = {p: temp_path(p) for p in (bin_path, mask_path, docs_path)}
    try:
        with open(tmps[bin_path], "wb") as f, \
                (open(tmps[mask_path], "wb") if loss_on else contextlib.nullcontext()) as mf:
            writer = TokenWriter(f, dtype, tokenizer.vocab_size, mf if loss_on else None)
            sources = fill(writer)
            writer.flush()
        offsets = writer.offsets()
        meta = {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "dtype": dtype.name,
                "n_tokens": writer.count, "tokenizer": tokenizer.to_dict(),
                "doc_separator": doc_separator, "sources": sources}
        if loss_on:
            meta["mask"] = {"file": mask_path.name, "dtype": "uint8", "loss_on": loss_on}
        if not np.array_equal(offsets, _offsets_from_sources(sources, writer.count)):
            offsets.astype("<i8").tofile(tmps[docs_path])
            meta["docs"] = {"file": docs_path.name, "dtype": "int64",
                            "n_docs": int(offsets.size - 1)}
        json_path.unlink(missing_ok=True)
        for final in (bin_path, mask_path, docs_path):
            if tmps[final].exists():
                os.replace(tmps[final], final)
            else:
                final.unlink(missing_ok=True)  # a stale companion of an earlier prepare
        write_json_atomic(json_path, meta)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return TokenSource(memmap_or_empty(bin_path, dtype), tokenizer, meta["tokenizer"], bin_path,
                       "prepared", _read_mask(meta, json_path, writer.count),
                       offsets, doc_separator)


def _offsets_from_sources(sources: Iterable[dict], n_tokens: int) -> np.ndarray | None:
    """Offsets when every source is one document (or empty); None when one holds several."""
    ends, total = [0], 0
    for s in sources:
        n_docs, n = s.get("n_docs"), s.get("n_tokens")
        if n_docs not in (0, 1) or not isinstance(n, int):
            return None
        total += n
        if n_docs == 1:
            ends.append(total)
    if total != n_tokens or ends[-1] != n_tokens:
        return None
    return np.asarray(ends if len(ends) > 1 else [0, 0], np.int64)  # no document: one empty


# ---------------------------------------------------------------------------------------------
# prepared: reading
# ---------------------------------------------------------------------------------------------

def _tokenizer_for(spec: dict | None, given: Tokenizer | None, where: str) -> Tokenizer | None:
    if given is not None:
        if spec is not None and as_json(given.to_dict()) != spec:
            raise DataError(f"{where}: was tokenized with {spec.get('name', spec)!r}, "
                            f"not the given tokenizer {given.name!r}")
        return given
    if spec is None:
        return None
    try:
        return tokenizer_from_dict(spec)
    except (TokenizerError, ImportError):  # e.g. a stand-in's spec: the tokens stay usable
        return None


def _companion(meta: dict, key: str, json_path: pathlib.Path, dtype: str, count: int
               ) -> np.ndarray:
    entry = meta[key]
    if not isinstance(entry, dict) or entry.get("dtype") != dtype or not isinstance(
            entry.get("file"), str):
        raise DataError(f"{json_path}: bad {key!r} entry {entry!r}")
    path = json_path.parent / entry["file"]
    if not path.is_file():
        raise DataError(f"{path}: no such file (named by {json_path})")
    dt = np.dtype(dtype).newbyteorder("<")
    size, want = path.stat().st_size, count * dt.itemsize
    if size != want:
        raise DataError(f"{path}: {size} bytes, {json_path} implies {count} {dtype} = {want}")
    return memmap_or_empty(path, dt)


def _read_mask(meta: dict, json_path: pathlib.Path, n_tokens: int) -> np.ndarray | None:
    if "mask" not in meta:
        return None
    return _companion(meta, "mask", json_path, "uint8", n_tokens)


def _read_offsets(meta: dict, json_path: pathlib.Path, n_tokens: int) -> np.ndarray | None:
    if "docs" not in meta:
        return _offsets_from_sources(meta.get("sources") or [], n_tokens)
    n_docs = meta["docs"].get("n_docs") if isinstance(meta["docs"], dict) else None
    if not isinstance(n_docs, int) or n_docs < 0:
        raise DataError(f"{json_path}: bad 'docs' entry {meta['docs']!r}")
    off = _companion(meta, "docs", json_path, "int64", n_docs + 1)
    if int(off[0]) != 0 or int(off[-1]) != n_tokens or (off.size > 1 and
                                                       bool((np.diff(off) < 0).any())):
        raise DataError(f"{json_path.parent / meta['docs']['file']}: document offsets do not "
                        f"run from 0 to {n_tokens} in order")
    return off


def read_prepared(prefix: PathLike, tokenizer: Tokenizer | None = None) -> TokenSource:
    """Open ``prefix.bin`` + ``prefix.json`` written by :func:`write_prepared` (memory-mapped),
    with its mask and document offsets when recorded.

    The tokenizer is rebuilt from the stored spec; a given ``tokenizer`` is used instead after
    checking that its ``to_dict()`` equals the stored one (a mismatch raises).
    """
    prefix = strip_suffix(pathlib.Path(prefix))
    bin_path, json_path = with_suffix(prefix, ".bin"), with_suffix(prefix, ".json")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{json_path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != PREPARED_FORMAT:
        raise DataError(f"{json_path}: not an rwkv-jax token metadata file")
    if meta.get("version") != PREPARED_VERSION:
        raise DataError(f"{json_path}: format version {meta.get('version')!r}, this reader "
                        f"knows {PREPARED_VERSION}")
    try:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    except (KeyError, TypeError) as e:
        raise DataError(f"{json_path}: bad or missing dtype ({e})") from None
    if dtype.kind not in "ui":
        raise DataError(f"{json_path}: dtype {dtype.name} is not an integer type")
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: no such file (metadata {json_path} exists)")
    n_tokens = int(meta["n_tokens"])
    size, want = bin_path.stat().st_size, n_tokens * dtype.itemsize
    if size != want:
        raise DataError(f"{bin_path}: {size} bytes, metadata says {meta['n_tokens']} "
                        f"{dtype.name} tokens = {want} bytes")
    spec = meta.get("tokenizer")
    tok = _tokenizer_for(spec, tokenizer, str(json_path))
    return TokenSource(memmap_or_empty(bin_path, dtype), tok, spec, bin_path, "prepared",
                       _read_mask(meta, json_path, n_tokens),
                       _read_offsets(meta, json_path, n_tokens), meta.get("doc_separator"))


# ---------------------------------------------------------------------------------------------
# binidx (Megatron MMapIndexedDataset, as used by RWKV-LM)
# ---------------------------------------------------------------------------------------------

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron's dtype codes. 6 and 7 are floating point (their meaning differs between forks) and
# cannot hold token ids; 9 and 10 appear in later forks.
_BINIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16,
                  9: np.uint32, 10: np.uint64}
_BINIDX_CODES = {np.dtype(v): k for k, v in _BINIDX_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class BinIdx:
    """A parsed binidx pair. ``tokens`` is the whole ``.bin`` (documents back to back)."""

    tokens: np.ndarray
    sizes: np.ndarray      # int32 [n_sequences], tokens per sequence
    pointers: np.ndarray   # int64 [n_sequences], byte offset of each sequence in the .bin
    doc_idx: np.ndarray    # int64 [n_docs], first sequence of each document (+ a final n_sequences)

    def sequence(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i``."""
        start = int(self.pointers[i]) // self.tokens.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def doc_offsets(self) -> np.ndarray | None:
        """Token offsets ``[n_docs + 1]`` of the documents (``doc_idx`` groups sequences), or
        None when the sequences are not stored back to back from the start of the ``.bin``
        (then token positions do not map to documents)."""
        n = int(self.tokens.shape[0])
        starts = self.pointers.astype(np.int64) // self.tokens.dtype.itemsize
        sizes = self.sizes.astype(np.int64)
        if starts.size and (int(starts[0]) != 0
                            or not np.array_equal(starts[1:], starts[:-1] + sizes[:-1])
                            or int(starts[-1] + sizes[-1]) != n):
            return None
        if not starts.size and n:
            return None
        bounds = np.concatenate([starts, [n]])
        doc_idx = np.asarray(self.doc_idx, np.int64)
        if doc_idx.size == 0 or int(doc_idx[-1]) != starts.size:
            doc_idx = np.concatenate([[0] if doc_idx.size == 0 else doc_idx, [starts.size]])
        if int(doc_idx[0]) != 0 or bool((np.diff(doc_idx) < 0).any()) or int(
                doc_idx.max()) > starts.size:
            return None
        return bounds[doc_idx]


def write_binidx(prefix: PathLike, documents: Iterable[Sequence[int]],
                 dtype: np.dtype | type = np.uint16) -> pathlib.Path:
    """Write ``prefix.bin`` + ``prefix.idx`` in Megatron's MMapIndexedDataset format.

    Each document is one sequence (``doc_idx = [0, 1, ..., n]``, as RWKV-LM's ``make_data.py``
    writes). Streams documents to disk; returns the ``.bin`` path.
    """
    prefix = strip_suffix(pathlib.Path(prefix))
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.newbyteorder("=") not in _BINIDX_CODES:
        raise DataError(f"binidx cannot store dtype {dtype}; one of "
                        f"{sorted(d.name for d in _BINIDX_CODES)}")
    code = _BINIDX_CODES[dtype.newbyteorder("=")]
    info = np.iinfo(dtype)
    bin_path, idx_path = with_suffix(prefix, ".bin"), with_suffix(prefix, ".idx")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    tmp_bin, tmp_idx = temp_path(bin_path), temp_path(idx_path)
    try:
        with open(tmp_bin, "wb") as f:
            for i, doc in enumerate(documents):
                arr = np.asarray(doc)
                if arr.ndim != 1:
                    raise DataError(f"binidx document {i}: expected a 1-D sequence of ids")
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise DataError(f"binidx document {i}: ids outside the range of {dtype.name}")
                arr.astype(dtype).tofile(f)
                sizes.append(int(arr.size))
        n = len(sizes)
        size_arr = np.asarray(sizes, dtype="<i4")
        pointers = np.zeros(n, dtype="<i8")
        if n:
            pointers[1:] = np.cumsum(size_arr[:-1], dtype=np.int64) * dtype.itemsize
        doc_idx = np.arange(n + 1, dtype="<i8")
        with open(tmp_idx, "wb") as f:
            f.write(BINIDX_MAGIC)
            f.write(np.asarray([1], "<u8").tobytes())
            f.write(np.asarray([code], "<u1").tobytes())
            f.write(np.asarray([n, n + 1], "<u8").tobytes())
            f.write(size_arr.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
        idx_path.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return bin_path


def read_binidx(prefix: PathLike) -> BinIdx:
    """Parse ``prefix.idx`` and memory-map ``prefix.bin``; every header field is validated."""
    prefix = strip_suffix(pathlib.Path(prefix))
    bin_path, idx_path = with_suffix(prefix, ".bin"), with_suffix(prefix, ".idx")
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    with open(idx_path, "rb") as f:
        head = f.read(len(BINIDX_MAGIC) + 8 + 1 + 8 + 8)
    if len(head) < len(BINIDX_MAGIC) or head[:len(BINIDX_MAGIC)] != BINIDX_MAGIC:
        raise DataError(f"{idx_path}: not a binidx index (magic {head[:9]!r}, expected "
                        f"{BINIDX_MAGIC!r})")
    if len(head) < 34:
        raise DataError(f"{idx_path}: truncated header ({len(head)} of 34 bytes)")
    version = int(np.frombuffer(head, "<u8", 1, 9)[0])
    if version != 1:
        raise DataError(f"{idx_path}: binidx version {version}, only version 1 is known")
    code = head[17]
    if code not in _BINIDX_DTYPES:
        kind = "a floating-point dtype, not token ids" if code in (6, 7) else "unknown"
        raise DataError(f"{idx_path}: dtype code {code} is {kind} (known: "
                        f"{ {k: np.dtype(v).name for k, v in _BINIDX_DTYPES.items()} })")
    dtype = np.dtype(_BINIDX_DTYPES[code]).newbyteorder("<")
    n_seq, n_doc = (int(v) for v in np.frombuffer(head, "<u8", 2, 18))
    want = 34 + 4 * n_seq + 8 * n_seq + 8 * n_doc
    have = idx_path.stat().st_size
    if have != want:
        raise DataError(f"{idx_path}: {have} bytes, but {n_seq} sequences and {n_doc} docs need "
                        f"{want}")
    idx = np.memmap(idx_path, dtype=np.uint8, mode="r") if have else np.zeros(0, np.uint8)
    sizes = np.frombuffer(idx, "<i4", n_seq, 34)
    pointers = np.frombuffer(idx, "<i8", n_seq, 34 + 4 * n_seq)
    doc_idx = np.frombuffer(idx, "<i8", n_doc, 34 + 12 * n_seq)
    bin_size = bin_path.stat().st_size
    if bin_size % dtype.itemsize:
        raise DataError(f"{bin_path}: {bin_size} bytes is not a whole number of {dtype.name}")
    if n_seq:
        ends = pointers.astype(np.int64) + sizes.astype(np.int64) * dtype.itemsize
        if sizes.min() < 0 or pointers.min() < 0 or int(ends.max()) > bin_size:
            raise DataError(f"{idx_path}: sequence pointers/sizes run past the end of {bin_path} "
                            f"({bin_size} bytes)")
    return BinIdx(memmap_or_empty(bin_path, dtype), sizes, pointers, doc_idx)
