"""Training data: token files, the default corpus, splits and step-keyed sampling.

Every reader returns a :class:`TokenSource`: a 1-D memory-mapped token array (nothing is loaded
into memory) plus the tokenizer when it is known. Formats:

* **prepared** (``name.bin`` + ``name.json``), written by :func:`prepare`: raw little-endian ids,
  ``uint16`` when ``vocab_size <= 65536`` else ``uint32``, and JSON metadata (dtype, token count,
  ``tokenizer.to_dict()``, sources).
* **binidx** (``name.bin`` + ``name.idx``): the Megatron ``MMapIndexedDataset`` that RWKV-LM trains
  from. The tokens are the ``.bin`` viewed as the index's dtype (the documents back to back).
* **text / jsonl** given directly: tokenized once with :func:`prepare` into a cache keyed by
  (path, size, mtime, tokenizer), reused on later runs.

:func:`open_tokens` picks the reader from what is on disk.

Sampling never depends on history: :func:`sample_batch` draws row ``r`` of step ``s`` from an RNG
keyed by ``(seed, s, r)``, so resuming at any step is exact and each host reads only its own rows.
``sampler="magic_prime"`` is RWKV-LM's permutation sampler (reference §5.5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import sys
import sysconfig
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:  # the tokenizers module is only needed at run time when a spec must be rebuilt
    from rwkv_jax.tokenizers import Tokenizer

__all__ = [
    "DataError", "TokenSource", "TrainValSplit", "EvalBatch",
    "token_dtype", "prepare", "read_prepared", "write_binidx", "read_binidx", "BinIdx",
    "open_tokens", "open_text", "default_cache_dir",
    "stdlib_corpus", "open_stdlib_corpus", "STDLIB_SEPARATOR",
    "split_tokens", "sample_batch", "magic_prime", "magic_prime_offsets",
    "eval_batches", "count_eval_batches", "count_utf8_bytes",
]

PREPARED_FORMAT = "rwkv-jax-tokens"
PREPARED_VERSION = 1
# Text is read and tokenized in pieces of this many characters (bounded memory); the last
# _MARGIN_CHARS of each are re-encoded with the next piece (see _encode_pieces).
_PIECE_CHARS = 1 << 20
_MARGIN_CHARS = 1024
# Token buffer flushed to disk at this many ids.
_FLUSH_TOKENS = 1 << 20

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """A 1-D token array (usually a read-only memmap) and what is known about it.

    Attributes:
      tokens: 1-D integer array of token ids.
      tokenizer: the tokenizer that produced them, when known and loadable.
      tokenizer_spec: the stored ``tokenizer.to_dict()`` (prepared files), even when the
        tokenizer itself could not be rebuilt.
      path: the file the tokens are read from.
      format: ``"prepared"``, ``"binidx"`` or ``"memory"``.
    """

    tokens: np.ndarray
    tokenizer: Tokenizer | None = None
    tokenizer_spec: dict | None = None
    path: pathlib.Path | None = None
    format: str = "memory"

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


def _empty_or_memmap(path: pathlib.Path, dtype: np.dtype, offset: int = 0) -> np.ndarray:
    # np.memmap refuses zero-length maps; an empty file is a valid (empty) token file.
    if path.stat().st_size - offset == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset)


def _with_suffix(prefix: pathlib.Path, suffix: str) -> pathlib.Path:
    return prefix.with_name(prefix.name + suffix)


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing specs."""
    return json.loads(json.dumps(obj))


def _tmp_path(final: pathlib.Path) -> pathlib.Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# prepare: text / jsonl -> prepared .bin + .json
# ---------------------------------------------------------------------------------------------

def _default_separator(tokenizer: Tokenizer) -> int | None:
    # World and GPT-NeoX-20B both use id 0 as end-of-text; byte/char vocabularies have no
    # reserved id, so nothing is inserted.
    name = str(getattr(tokenizer, "name", "")).lower()
    return 0 if any(k in name for k in ("world", "20b", "neox")) else None


def _text_pieces(f: io.TextIOBase, piece_chars: int | None = None) -> Iterator[str]:
    """The stream's text in reads of ``piece_chars`` characters (default ``_PIECE_CHARS``)."""
    piece_chars = piece_chars or _PIECE_CHARS
    while chunk := f.read(piece_chars):
        yield chunk


def _encode_pieces(pieces: Iterable[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Encode a long text given in pieces, as if it were encoded whole, in bounded memory.

    Each piece is encoded with the unfinished tail of the previous one in front. Only the ids
    that end more than ``_MARGIN_CHARS`` before the end of the text so far are emitted; the
    tail they leave is carried over and re-encoded. The cut always falls where the emitted ids
    decode exactly to a prefix of the text, so no text is lost or repeated with any tokenizer
    whose ``decode`` inverts ``encode``. For tokenizers whose choice at a position depends
    on a bounded lookahead shorter than the margin (bytes, chars, World's greedy match of
    tokens up to 128 bytes) the result equals encoding the whole text at once.
    """
    carry, rest = "", []
    for piece in pieces:
        text = carry + piece
        ids = tokenizer.encode(text)
        keep, carry = _stable_prefix(ids, text, tokenizer)
        if len(carry) > 4 * _PIECE_CHARS:  # no clean cut in sight: bound memory, cut here
            keep, carry = len(ids), ""
        yield ids[:keep]
        rest = ids[keep:]
    yield rest  # at the end of the text the carried ids are final as they stand


def _stable_prefix(ids: list[int], text: str, tokenizer: Tokenizer) -> tuple[int, str]:
    """``(k, tail)``: ``ids[k:]`` decode exactly to ``tail``, a suffix of ``text`` of at least
    ``_MARGIN_CHARS``. ``(0, text)`` while the text is too short to emit anything;
    ``(len(ids), "")`` (a plain cut) when no clean cut is found, e.g. a ``decode`` that does
    not invert ``encode``."""
    if len(text) <= 2 * _MARGIN_CHARS or len(ids) < 2:
        return 0, text
    # First guess from the mean characters per token, then widen.
    m, misses = max(1, min(len(ids) - 1, len(ids) * _MARGIN_CHARS // len(text))), 0
    while m < len(ids):
        tail = tokenizer.decode(ids[len(ids) - m:])
        if len(tail) < _MARGIN_CHARS:  # short tokens here (e.g. bytes of CJK text): take more
            m = min(2 * m, len(ids))
            continue
        # Clean when the tail is a suffix of the text, i.e. not a split UTF-8 sequence
        # (which decodes to U+FFFD); a few steps back always find one for exact tokenizers.
        if text.endswith(tail):
            return len(ids) - m, tail
        misses += 1
        if misses > 16:
            return len(ids), ""
        m += 1
    return 0, text


class _TokenWriter:
    """Buffers token ids, checks their range and appends them to a binary file as ``dtype``."""

    def __init__(self, f, dtype: np.dtype, vocab_size: int):
        self.f, self.dtype, self.vocab_size = f, dtype, vocab_size
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.count = 0  # ids accepted so far (written or buffered)

    def extend(self, ids: Sequence[int], where: str) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"{where}: token id {lo if lo < 0 else hi} outside "
                                f"[0, {self.vocab_size}) of the tokenizer")
        self.parts.append(arr.astype(self.dtype))
        self.pending += arr.size
        self.count += arr.size
        if self.pending >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        for part in self.parts:
            part.tofile(self.f)
        self.parts, self.pending = [], 0


def _encode_text_stream(f, writer: _TokenWriter, tokenizer: Tokenizer, where: str) -> None:
    for ids in _encode_pieces(_text_pieces(f), tokenizer):
        writer.extend(ids, where)


def _open_text(path: pathlib.Path):
    # newline="": keep the file's line endings exactly (lossless, like reading bytes).
    return open(path, encoding="utf-8", newline="")


def _prepare_file(path: pathlib.Path, writer: _TokenWriter, tokenizer: Tokenizer,
                  sep: int | None) -> dict:
    start, n_docs = writer.count, 0
    try:
        with _open_text(path) as f:
            if path.suffix.lower() == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(f'{where}: expected an object with a string "text" field')
                    _encode_text_stream(io.StringIO(obj["text"]), writer, tokenizer, where)
                    if sep is not None:
                        writer.extend([sep], where)
                    n_docs += 1
            else:
                _encode_text_stream(f, writer, tokenizer, str(path))
                if sep is not None:
                    writer.extend([sep], str(path))
                n_docs = 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    return {"path": str(path), "bytes": path.stat().st_size, "n_docs": n_docs,
            "n_tokens": writer.count - start}


def _write_prepared(out_prefix: PathLike, tokenizer: Tokenizer, doc_separator: int | None,
                    fill: Callable[[_TokenWriter], list[dict]]) -> TokenSource:
    """Create ``out_prefix.bin``/``.json`` atomically; ``fill(writer)`` returns the sources."""
    prefix = pathlib.Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, json_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".json")
    dtype = token_dtype(tokenizer.vocab_size)
    if doc_separator is not None and not 0 <= doc_separator < tokenizer.vocab_size:
        raise DataError(f"doc_separator {doc_separator} outside [0, {tokenizer.vocab_size})")
    tmp = _tmp_path(bin_path)
    try:
        with open(tmp, "wb") as f:
            writer = _TokenWriter(f, dtype, tokenizer.vocab_size)
            sources = fill(writer)
            writer.flush()
        meta = {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "dtype": dtype.name,
                "n_tokens": writer.count, "tokenizer": tokenizer.to_dict(),
                "doc_separator": doc_separator, "sources": sources}
        # The .json is written last: a reader that finds it knows the .bin is complete.
        json_path.unlink(missing_ok=True)
        os.replace(tmp, bin_path)
        _write_json_atomic(json_path, meta)
    finally:
        tmp.unlink(missing_ok=True)
    return TokenSource(_empty_or_memmap(bin_path, dtype), tokenizer, meta["tokenizer"], bin_path,
                       "prepared")


def prepare(inputs: Sequence[PathLike] | PathLike, out_prefix: PathLike,
            tokenizer: Tokenizer | str, *,
            doc_separator: int | None | Literal["auto"] = "auto") -> TokenSource:
    """Tokenize text files into ``out_prefix.bin`` (raw ids) + ``out_prefix.json`` (metadata).

    Args:
      inputs: files, in order. ``.jsonl``: one ``{"text": ...}`` object per line (blank lines are
        skipped; a bad line raises :class:`DataError` naming file and line), each object one
        document. Any other suffix: the whole file is one UTF-8 document, line endings kept.
      out_prefix: output path without suffix.
      tokenizer: any object with ``name``, ``vocab_size``, ``encode``, ``decode``,
        ``to_dict``; or a spec string for ``get_tokenizer`` (``"char"`` builds the vocabulary
        from the inputs).
      doc_separator: id appended after every document, or None. ``"auto"``: 0 (end-of-text) for
        World / 20B tokenizers, None for byte and char tokenizers.

    Returns:
      The prepared tokens as a :class:`TokenSource`.

    Streaming with bounded memory: text is encoded in ~1M-character pieces that overlap by a
    margin, giving the same ids as encoding each document whole for byte, char and World
    tokenizers (see :func:`_encode_pieces`). Both files are written to temporaries and renamed
    into place.
    """
    paths = [pathlib.Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [
        pathlib.Path(p) for p in inputs]
    if not paths:
        raise DataError("prepare: no input files")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    tokenizer = _resolve_tokenizer(
        tokenizer, lambda: (t for p in paths for t in _iter_file_text(p)))
    sep = _default_separator(tokenizer) if doc_separator == "auto" else doc_separator
    return _write_prepared(out_prefix, tokenizer, sep,
                           lambda w: [_prepare_file(p, w, tokenizer, sep) for p in paths])


def _tokenizer_from_spec(spec: dict | None, given: Tokenizer | None,
                         where: str) -> Tokenizer | None:
    if given is not None:
        if spec is not None and _as_json(given.to_dict()) != spec:
            raise DataError(f"{where}: was tokenized with {spec.get('name', spec)!r}, "
                            f"not the given tokenizer {given.name!r}")
        return given
    if spec is None:
        return None
    try:
        from rwkv_jax.tokenizers import tokenizer_from_dict
        return tokenizer_from_dict(spec)
    except Exception:  # noqa: BLE001 - unknown spec or tokenizer module absent: tokens stay usable
        return None


def read_prepared(prefix: PathLike, tokenizer: Tokenizer | None = None) -> TokenSource:
    """Open ``prefix.bin`` + ``prefix.json`` written by :func:`prepare` (memory-mapped).

    The tokenizer is rebuilt from the stored spec; a given ``tokenizer`` is used instead after
    checking that its ``to_dict()`` equals the stored one (a mismatch raises).
    """
    prefix = _strip_suffix(pathlib.Path(prefix))
    bin_path, json_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".json")
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
    size, want = bin_path.stat().st_size, int(meta["n_tokens"]) * dtype.itemsize
    if size != want:
        raise DataError(f"{bin_path}: {size} bytes, metadata says {meta['n_tokens']} "
                        f"{dtype.name} tokens = {want} bytes")
    spec = meta.get("tokenizer")
    tok = _tokenizer_from_spec(spec, tokenizer, str(json_path))
    return TokenSource(_empty_or_memmap(bin_path, dtype), tok, spec, bin_path, "prepared")


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


def write_binidx(prefix: PathLike, documents: Iterable[Sequence[int]],
                 dtype: np.dtype | type = np.uint16) -> pathlib.Path:
    """Write ``prefix.bin`` + ``prefix.idx`` in Megatron's MMapIndexedDataset format.

    Each document is one sequence (``doc_idx = [0, 1, ..., n]``, as RWKV-LM's ``make_data.py``
    writes). Streams documents to disk; returns the ``.bin`` path.
    """
    prefix = _strip_suffix(pathlib.Path(prefix))
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.newbyteorder("=") not in _BINIDX_CODES:
        raise DataError(f"binidx cannot store dtype {dtype}; one of "
                        f"{sorted(d.name for d in _BINIDX_CODES)}")
    code = _BINIDX_CODES[dtype.newbyteorder("=")]
    info = np.iinfo(dtype)
    bin_path, idx_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".idx")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    tmp_bin, tmp_idx = _tmp_path(bin_path), _tmp_path(idx_path)
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
    prefix = _strip_suffix(pathlib.Path(prefix))
    bin_path, idx_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".idx")
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
    return BinIdx(_empty_or_memmap(bin_path, dtype), sizes, pointers, doc_idx)


# ---------------------------------------------------------------------------------------------
# open_tokens: dispatch + the text cache
# ---------------------------------------------------------------------------------------------

TokenizerLike = Any  # a Tokenizer, a spec string for get_tokenizer ("bytes", "char", ...), or None


def _strip_suffix(p: pathlib.Path) -> pathlib.Path:
    return p.with_suffix("") if p.suffix in (".bin", ".idx", ".json") else p


def default_cache_dir() -> pathlib.Path:
    """``$RWKV_JAX_CACHE/tokens``, else ``$XDG_CACHE_HOME/rwkv-jax/tokens``, else
    ``~/.cache/rwkv-jax/tokens``."""
    if os.environ.get("RWKV_JAX_CACHE"):
        return pathlib.Path(os.environ["RWKV_JAX_CACHE"]).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "rwkv-jax" / "tokens"


def _cache_key(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tokenizer_key(tokenizer: TokenizerLike) -> Any:
    """What identifies a tokenizer in a cache key: its ``to_dict()``, or the spec string (with
    the size and mtime when the spec names a file, e.g. a ``tokenizer.json``)."""
    if not isinstance(tokenizer, str):
        return tokenizer.to_dict()
    p = pathlib.Path(tokenizer).expanduser()
    if p.is_file():
        st = p.stat()
        return {"spec": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"spec": tokenizer}


def _resolve_tokenizer(tokenizer: TokenizerLike, chars: Callable[[], Iterable[str]]) -> Tokenizer:
    """A Tokenizer object from a spec; ``"char"`` builds its vocabulary from ``chars()``
    (pieces of the text to be tokenized)."""
    if not isinstance(tokenizer, str):
        return tokenizer
    from rwkv_jax import tokenizers
    if tokenizer == "char":
        seen: set[str] = set()
        for piece in chars():
            seen.update(piece)
        return tokenizers.CharTokenizer.from_text("".join(sorted(seen)))
    return tokenizers.get_tokenizer(tokenizer)


def _cached_prepare(key_fields: dict, stem: str, tokenizer: TokenizerLike,
                    cache_dir: PathLike | None, make) -> TokenSource:
    """Return the cache entry for ``key_fields`` + tokenizer, calling ``make(prefix)`` on a miss."""
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key_fields = {**key_fields, "tokenizer": _tokenizer_key(tokenizer),
                  "format": PREPARED_VERSION}
    prefix = cache / f"{stem}-{_cache_key(key_fields)}"
    if _with_suffix(prefix, ".json").is_file():
        try:
            src = read_prepared(prefix, None if isinstance(tokenizer, str) else tokenizer)
        except DataError:
            src = None  # damaged entry: rebuild it below
        if src is not None:
            if src.tokenizer is None and isinstance(tokenizer, str) and tokenizer != "char":
                src = dataclasses.replace(src, tokenizer=_resolve_tokenizer(tokenizer, list))
            return src
    return make(prefix)


def _iter_file_text(path: pathlib.Path) -> Iterator[str]:
    """The text ``prepare`` would tokenize from ``path``, in pieces (for char vocabularies)."""
    with _open_text(path) as f:
        if path.suffix.lower() == ".jsonl":
            for line in f:
                try:
                    text = json.loads(line)["text"] if line.strip() else ""
                except (ValueError, KeyError, TypeError):
                    continue  # prepare() reports bad lines with their line numbers
                if isinstance(text, str):
                    yield text
        else:
            yield from _text_pieces(f)


def open_text(path: PathLike, tokenizer: TokenizerLike = "bytes", *,
              cache_dir: PathLike | None = None,
              doc_separator: int | None | Literal["auto"] = "auto") -> TokenSource:
    """Tokenize a text or ``.jsonl`` file once (:func:`prepare`) and reuse the cached result.

    The cache entry is keyed by the absolute path, size, mtime and the tokenizer
    (``to_dict()``, or the spec string); a changed file or tokenizer makes a new entry.
    ``tokenizer`` may be a spec string for ``get_tokenizer``; ``"char"`` builds the
    vocabulary from this file. ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    p = pathlib.Path(path).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sep": doc_separator}

    return _cached_prepare(key, p.stem, tokenizer, cache_dir,
                           lambda prefix: prepare([p], prefix, tokenizer,
                                                  doc_separator=doc_separator))


def open_tokens(path: PathLike | None, tokenizer: TokenizerLike = None, *,
                cache_dir: PathLike | None = None, max_bytes: int | None = None) -> TokenSource:
    """Open whatever token data is at ``path``; ``None`` means the default corpus.

    * ``None``: :func:`open_stdlib_corpus` (``max_bytes`` caps it; it applies to nothing else).
    * ``name.bin``/``name.idx``/``name`` with ``name.bin`` and ``name.idx``: binidx. It records
      no tokenizer, so ``tokenizer`` must say which (a spec string is resolved); the first 16M
      ids are checked against its vocabulary.
    * ``name.bin``/``name.json``/``name`` with ``name.json`` from :func:`prepare`: prepared;
      the stored tokenizer is used. A Tokenizer object, if given, must match it; a spec
      string is ignored (it only says how to tokenize text).
    * any other file: text or ``.jsonl``, tokenized with ``tokenizer`` (default ``"bytes"``) and
      cached (:func:`open_text`).
    """
    if path is None:
        return open_stdlib_corpus(tokenizer if tokenizer is not None else "bytes",
                                  max_bytes=max_bytes, cache_dir=cache_dir)
    p = pathlib.Path(path).expanduser()
    prefix = _strip_suffix(p)
    has = lambda suffix: _with_suffix(prefix, suffix).is_file()  # noqa: E731
    if p.suffix in (".bin", ".idx", ".json") or not p.is_file():
        if has(".bin") and has(".idx") and p.suffix != ".json":
            return _open_binidx(prefix, tokenizer)
        if has(".json") and p.suffix != ".idx":
            return read_prepared(prefix, None if isinstance(tokenizer, str) else tokenizer)
        if not p.is_file():
            raise DataError(f"{path}: no such file (nor {prefix}.bin with .idx or .json)")
        if p.suffix == ".bin":
            raise DataError(f"{p}: a .bin without {prefix.name}.idx or {prefix.name}.json "
                            "beside it; its dtype is unknown")
    return open_text(p, tokenizer if tokenizer is not None else "bytes", cache_dir=cache_dir)


def _open_binidx(prefix: pathlib.Path, tokenizer: TokenizerLike) -> TokenSource:
    b = read_binidx(prefix)
    bin_path = _with_suffix(prefix, ".bin")
    if tokenizer is None:
        return TokenSource(b.tokens, None, None, bin_path, "binidx")
    if tokenizer == "char":
        raise DataError(f"{bin_path}: binidx tokens cannot use a 'char' tokenizer (its "
                        "vocabulary is built from text); name the tokenizer they were made with")
    tok = _resolve_tokenizer(tokenizer, list)
    head = np.asarray(b.tokens[:1 << 24])  # a cheap check that catches the wrong tokenizer
    if head.size and int(head.max()) >= tok.vocab_size:
        raise DataError(f"{bin_path}: holds id {int(head.max())}, outside tokenizer "
                        f"{tok.name!r} (vocab_size {tok.vocab_size}); pass the tokenizer the "
                        "data was made with (RWKV-LM binidx is usually 'world' or 20B)")
    return TokenSource(b.tokens, tok, tok.to_dict(), bin_path, "binidx")


# ---------------------------------------------------------------------------------------------
# The default corpus: the Python standard library's own source
# ---------------------------------------------------------------------------------------------

STDLIB_SEPARATOR = b"\n\n"
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                               "lib2to3", "__pycache__"})


def _stdlib_files() -> list[tuple[str, pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = pathlib.Path(dirpath) / name
                out.append((full.relative_to(root).as_posix(), full))
    out.sort()
    return out


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The standard library's ``.py`` sources, concatenated: the zero-download default corpus.

    Files under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``,
    ``dist-packages``, ``test``, ``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``
    directories and any file that cannot be read or is not UTF-8, in sorted relative-path
    order, joined by :data:`STDLIB_SEPARATOR`. Deterministic for a given Python install.
    ``max_bytes`` truncates the result (at a UTF-8 character boundary).
    """
    parts, total = [], 0
    for _, full in _stdlib_files():
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            data = full.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if parts:
            parts.append(STDLIB_SEPARATOR)
            total += len(STDLIB_SEPARATOR)
        parts.append(data)
        total += len(data)
    out = b"".join(parts)
    if max_bytes is not None and len(out) > max_bytes:
        cut = max(max_bytes, 0)
        while 0 < cut < len(out) and (out[cut] & 0xC0) == 0x80:  # inside a UTF-8 sequence
            cut -= 1
        out = out[:cut]
    return out


def open_stdlib_corpus(tokenizer: TokenizerLike = "bytes", *, max_bytes: int | None = None,
                       cache_dir: PathLike | None = None) -> TokenSource:
    """:func:`stdlib_corpus` tokenized with ``tokenizer``, cached like :func:`open_text`.

    The cache key covers the Python version, the stdlib path, ``max_bytes`` and a fingerprint
    of the file list (names, sizes, mtimes), so an updated install makes a new entry.
    """
    fp = hashlib.sha256()
    for rel, full in _stdlib_files():
        try:
            st = full.stat()
        except OSError:
            continue
        fp.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = {"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version,
           "max_bytes": max_bytes, "files": fp.hexdigest()}

    def make(prefix: pathlib.Path) -> TokenSource:
        text = stdlib_corpus(max_bytes).decode("utf-8")
        tok = _resolve_tokenizer(tokenizer, lambda: [text])
        src = {"path": "<python stdlib>", "bytes": len(text.encode()), "n_docs": 1}

        def fill(w: _TokenWriter) -> list[dict]:
            _encode_text_stream(io.StringIO(text), w, tok, "<python stdlib>")
            return [{**src, "n_tokens": w.count}]

        return _write_prepared(prefix, tok, None, fill)

    return _cached_prepare(key, "python-stdlib", tokenizer, cache_dir, make)


# ---------------------------------------------------------------------------------------------
# Split, sampling, evaluation
# ---------------------------------------------------------------------------------------------

class TrainValSplit(NamedTuple):
    """Views of one token array: the first part trains, the tail validates."""

    train: np.ndarray
    val: np.ndarray


def split_tokens(tokens: np.ndarray, val_fraction: float) -> TrainValSplit:
    """First ``int(n * (1 - f))`` tokens train, the rest validate (nanoGPT's 90/10 convention).

    Both are views (no copy). ``val_fraction = 0`` gives an empty validation array.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = int(tokens.shape[0])
    n_train = int(n * (1.0 - val_fraction))
    return TrainValSplit(tokens[:n_train], tokens[n_train:])


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:  # deterministic Miller-Rabin for n < 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(n_tokens: int, ctx_len: int) -> int:
    """RWKV-LM's magic prime: the largest prime ``p ≡ 2 (mod 3)`` below ``n_tokens/ctx_len - 1``.

    Cubing is then a bijection mod ``p``, so :func:`magic_prime_offsets` visits each of the ``p``
    windows once per ``p`` consecutive samples.
    """
    bound = n_tokens / ctx_len - 1  # strict upper bound; offsets end at (p-1)*ctx + ctx + 1 tokens
    p = math.ceil(bound) - 1
    p -= (p - 2) % 3  # p ≡ 2 (mod 3)
    while p >= 2:
        if _is_prime(p):
            return p
        p -= 3
    raise DataError(f"{n_tokens} tokens hold too few windows of {ctx_len} for the magic-prime "
                    f"sampler (need n_tokens/ctx_len - 1 > 2)")


def magic_prime_offsets(sample_index: np.ndarray | Sequence[int], n_tokens: int,
                        ctx_len: int) -> np.ndarray:
    """Window starts for global sample indices (0-based), as RWKV-LM's ``dataset.py``.

    ``ii = 1 + sample_index``; offset ``= ((⌊p·(√5−1)/2⌋ · ii³) mod p) · ctx_len``.
    """
    p = magic_prime(n_tokens, ctx_len)
    factor = int(p * (math.sqrt(5) - 1) / 2)
    return np.asarray([((factor * pow(1 + int(i), 3, p)) % p) * ctx_len
                       for i in np.asarray(sample_index).ravel()], dtype=np.int64)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijective, well-mixed map of uint64 (wrapping math)."""
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _counter_hash(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """A counter-based random uint64 per row, a pure function of ``(seed, step, row)``."""
    key = _splitmix64(np.asarray([seed & _MASK64], np.uint64))
    key = _splitmix64(key ^ np.asarray([step & _MASK64], np.uint64))
    return _splitmix64(key ^ np.asarray(rows, np.uint64))


def sample_batch(tokens: np.ndarray, *, step: int, batch_size: int, ctx_len: int, seed: int,
                 host_index: int = 0, host_count: int = 1,
                 sampler: Literal["random", "magic_prime"] = "random",
                 ) -> tuple[np.ndarray, np.ndarray]:
    """This host's rows of the global batch for ``step``: ``(x, y)``, each ``[B_local, T]`` int32.

    ``batch_size`` is the global batch; host ``h`` of ``host_count`` gets global rows
    ``h*B_local .. (h+1)*B_local - 1`` with ``B_local = batch_size // host_count``, so the
    hosts' slices concatenated are the single-host batch. Row ``g`` is a window of
    ``ctx_len + 1`` tokens, ``x = window[:-1]``, ``y = window[1:]``, whose start depends only on
    ``(seed, step, g)``:

    * ``"random"``: uniform over all starts (up to a 2^-64-relative modulo bias), from a
      counter-based hash of ``(seed, step, g)`` (SplitMix64, vectorized over rows).
    * ``"magic_prime"``: RWKV-LM's permutation (:func:`magic_prime_offsets`) of sample
      ``step * batch_size + g``; ``seed`` is unused. Windows start at multiples of ``ctx_len``
      and each is visited once per ``p`` samples.
    """
    if batch_size <= 0 or ctx_len <= 0:
        raise DataError(f"batch_size and ctx_len must be positive, got {batch_size}, {ctx_len}")
    if host_count <= 0 or not 0 <= host_index < host_count:
        raise DataError(f"host_index {host_index} not in [0, host_count={host_count})")
    if batch_size % host_count:
        raise DataError(f"batch_size {batch_size} is not divisible by host_count {host_count}")
    if step < 0 or seed < 0:
        raise DataError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    n = int(tokens.shape[0])
    if n < ctx_len + 1:
        raise DataError(f"{n} tokens are fewer than one window of ctx_len + 1 = {ctx_len + 1}")
    b_local = batch_size // host_count
    rows = host_index * b_local + np.arange(b_local)
    if sampler == "random":
        starts = (_counter_hash(seed, step, rows) % np.uint64(n - ctx_len)).tolist()
    elif sampler == "magic_prime":
        starts = magic_prime_offsets(step * batch_size + rows, n, ctx_len).tolist()
    else:
        raise DataError(f"unknown sampler {sampler!r}; use 'random' or 'magic_prime'")
    win = np.stack([np.asarray(tokens[s:s + ctx_len + 1]) for s in starts]).astype(np.int32)
    return win[:, :-1], win[:, 1:]


class EvalBatch(NamedTuple):
    """``x``, ``y``: ``[B, T]`` int32; ``mask``: ``[B, T]`` bool, True where ``y`` is a target."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


def count_eval_batches(n_tokens: int, *, batch_size: int, ctx_len: int) -> int:
    """How many batches :func:`eval_batches` yields without ``max_batches``."""
    n_windows = -(-max(n_tokens - 1, 0) // ctx_len)
    return -(-n_windows // batch_size)


def eval_batches(tokens: np.ndarray, *, batch_size: int, ctx_len: int,
                 max_batches: int | None = None) -> Iterator[EvalBatch]:
    """Deterministic, non-overlapping windows over ``tokens`` for validation loss.

    Window ``j`` has ``x = tokens[j*T : j*T+T]`` and ``y = tokens[j*T+1 : j*T+T+1]``, so every
    token after the first is a target exactly once. Nothing is dropped: the last window and the
    last batch are padded with id 0 and ``mask`` marks the real targets (average the loss over
    ``mask``). Each window starts from a fresh state, as in nanoGPT-style evaluation.
    """
    if batch_size <= 0 or ctx_len <= 0:
        raise DataError(f"batch_size and ctx_len must be positive, got {batch_size}, {ctx_len}")
    n = int(tokens.shape[0])
    n_targets = max(n - 1, 0)
    total = count_eval_batches(n, batch_size=batch_size, ctx_len=ctx_len)
    if max_batches is not None:
        total = min(total, max_batches)
    for b in range(total):
        x = np.zeros((batch_size, ctx_len), np.int32)
        y = np.zeros((batch_size, ctx_len), np.int32)
        mask = np.zeros((batch_size, ctx_len), np.bool_)
        for r in range(batch_size):
            start = (b * batch_size + r) * ctx_len
            m = min(ctx_len, n_targets - start)
            if m <= 0:
                break
            chunk = np.asarray(tokens[start:start + m + 1])
            x[r, :m], y[r, :m], mask[r, :m] = chunk[:-1], chunk[1:], True
        yield EvalBatch(x, y, mask)


def count_utf8_bytes(tokens: np.ndarray, tokenizer: Tokenizer, *, chunk: int = 1 << 16) -> int:
    """UTF-8 bytes of the decoded text, for bits per byte = ``sum(nats) / ln 2 / bytes``.

    Decodes in chunks of ``chunk`` tokens; a character split across a chunk boundary may be
    counted as replacement characters, an error of a few bytes per chunk at most.
    """
    total = 0
    for i in range(0, int(tokens.shape[0]), chunk):
        total += len(tokenizer.decode(np.asarray(tokens[i:i + chunk]).tolist()).encode("utf-8"))
    return total
