"""Tokenizers behind one small interface, for training data and for generation.

* :class:`ByteTokenizer` -- vocab 256, id = byte value (the tiny fixtures use it).
* :class:`CharTokenizer` -- nanoGPT char-level: vocab = the sorted set of characters.
* :class:`WorldTokenizer` -- the official RWKV World vocab (``rwkv_vocab_v20230424.txt``,
  reference §6): greedy longest match over the UTF-8 bytes, id 0 = end of text, vocab 65536.
* :class:`HFTokenizer` -- a Hugging Face ``tokenizer.json`` (e.g. the GPT-NeoX ``20B``
  tokenizer of the RWKV-4 Pile models), through the ``tokenizers`` package.

Every tokenizer has ``name``, ``vocab_size``, ``encode(text) -> list[int]``,
``decode_bytes(ids) -> bytes``, ``decode(ids) -> str`` (UTF-8, ``errors="replace"``) and
``to_dict()``; :func:`tokenizer_from_dict` rebuilds one from that dict (run directories).
:func:`resolve_tokenizer` is the one place a spec (CLI/config string, ``tokenizer.json``, run
directory, or nothing but the model's vocabulary size) becomes a tokenizer; every bad spec is a
:class:`TokenizerError` naming it. :class:`StreamDecoder` turns a stream of ids into text
without ever emitting half a multi-byte character.

World encoding is exact greedy longest match (checked against the official ``TRIE_TOKENIZER``)
and fast on long text: greedy results are cached per word-like piece, with a check that makes
the cached result exact (:meth:`WorldTokenizer.encode_bytes`).
"""

from __future__ import annotations

import ast
import codecs
import functools
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "CharTokenizer", "WorldTokenizer", "HFTokenizer",
           "StreamDecoder", "TokenizerError", "resolve_tokenizer", "get_tokenizer",
           "tokenizer_from_dict", "WORLD_VOCAB_PATH", "TOKENIZER_CHOICES"]

WORLD_VOCAB_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "rwkv_vocab_v20230424.txt"
TOKENIZER_CHOICES = ("bytes", "world", "char (training: built from the text)",
                     "<path to a tokenizer.json or a run directory>")

PathLike = str | os.PathLike


class TokenizerError(ValueError):
    """A tokenizer spec or file is unknown, missing or malformed; the message names it."""


class Tokenizer:
    """Base class: subclasses implement ``encode``, ``decode_bytes`` and ``to_dict``."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(_as_int_list(ids)).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able spec that :func:`tokenizer_from_dict` turns back into this tokenizer."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _as_int_list(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    if hasattr(ids, "tolist"):  # jax arrays
        return np.asarray(ids).reshape(-1).tolist()
    return [int(i) for i in ids]


# ---- bytes -------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """Vocab 256: each UTF-8 byte is its own id."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8"))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer: ids out of range 0..255: {bad[:10]}")
        return bytes(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bytes"}


# ---- characters --------------------------------------------------------------------------

class CharTokenizer(Tokenizer):
    """nanoGPT char-level: id = index of the character in the sorted vocabulary string."""

    name = "char"

    def __init__(self, chars: str):
        chars = "".join(sorted(set(chars)))
        if not chars:
            raise ValueError("char tokenizer needs at least one character")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text`` (every distinct character, sorted)."""
        return cls(text)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - stoi.keys())
            raise ValueError(f"char tokenizer: {len(unknown)} character(s) not in the "
                             f"vocabulary: {''.join(unknown)[:50]!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"char tokenizer: ids out of range 0..{self.vocab_size - 1}: "
                             f"{bad[:10]}")
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}


# ---- RWKV World --------------------------------------------------------------------------

def _read_world_vocab(path: PathLike) -> list[bytes]:
    """Token bytes by id (index 0 = end of text, b""), parsed as the official tokenizer does.

    Lines are ``<id> <python str or bytes literal> <byte length>``; ``\\r`` is stripped so the
    CRLF copies (RWKV-v5, pip) read the same as the LF copy.
    """
    tokens: dict[int, bytes] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            idx, lit = int(line[:first]), ast.literal_eval(line[first:last].strip())
            tok = lit.encode("utf-8") if isinstance(lit, str) else lit
            if not isinstance(tok, bytes) or len(tok) != int(line[last:]):
                raise TokenizerError(f"{path}:{lineno}: bad vocab line {line[:80]!r}")
            if idx <= 0 or idx in tokens:
                raise TokenizerError(f"{path}:{lineno}: bad or repeated id {idx}")
            tokens[idx] = tok
    n = max(tokens)
    if sorted(tokens) != list(range(1, n + 1)):
        raise TokenizerError(f"{path}: ids are not contiguous 1..{n}")
    return [b""] + [tokens[i] for i in range(1, n + 1)]


# Word-like pieces: a partition of any byte string (every byte matches some branch). Greedy
# token boundaries usually fall between pieces, so per-piece results can be cached; the check
# in ``WorldTokenizer._world_piece`` makes the result exact where they do not. The regex
# yields each piece with the byte after it (the cache key); the last piece has none.
_PIECE = rb"(?: ?[A-Za-z]+| ?[0-9]+| ?[\x80-\xff]+| ?[^\sA-Za-z0-9\x80-\xff]+|\s)"
_PIECE_AND_NEXT = re.compile(rb"(?=(" + _PIECE + rb"(?:[\s\S]|\Z)))" + _PIECE)
_SMALL = 4096            # below this many bytes the plain greedy is as fast
_CACHE_PIECE_MAX = 64    # longer pieces (long CJK runs) are not cached
_CACHE_MAX = 1 << 20     # entries; the cache is cleared when full


@functools.lru_cache(maxsize=4)
def _load_world(path: str) -> tuple[list[bytes], dict[bytes, int], dict[bytes, tuple[int, ...]]]:
    tokens = _read_world_vocab(path)
    to_id = {t: i for i, t in enumerate(tokens) if i}
    cand: dict[bytes, set[int]] = {}
    for t in tokens:
        if len(t) >= 2:
            cand.setdefault(t[:2], set()).add(len(t))
    return tokens, to_id, {k: tuple(sorted(v, reverse=True)) for k, v in cand.items()}


@functools.lru_cache(maxsize=4)
def _world_prefixes(path: str) -> frozenset[bytes]:
    """Every prefix of length >= 2 of every vocab entry (the entries included)."""
    return frozenset(t[:j] for t in _load_world(path)[0] for j in range(2, len(t) + 1))


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer (v5/v6/v7 World models), identical to the official one.

    Greedy longest match from the left over the UTF-8 bytes; no normalization, no
    pre-tokenization, no BOS. Id 0 is end of text (not in the vocab file); ids 1..256 are the
    single bytes, so any byte string is encodable; the model vocab is 65536.
    """

    name = "world"
    vocab_size = 65536
    EOT = 0

    def __init__(self, path: PathLike | None = None):
        self.path = None if path is None else str(path)
        self._file = str(WORLD_VOCAB_PATH if path is None else pathlib.Path(path).resolve())
        self.tokens, self._to_id, self._cand = _load_world(self._file)
        self.n_vocab_entries = len(self.tokens) - 1      # 65529 for the official file
        self.max_token_len = max(map(len, self.tokens))  # 128
        # piece + next byte -> (exact ids, tail to carry into the next piece)
        self._cache: dict[bytes, tuple[list[int], bytes]] = {}

    def encode(self, text: str | bytes) -> list[int]:
        return self.encode_bytes(text if isinstance(text, (bytes, bytearray))
                                 else text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest-match ids of ``data``.

        Long inputs go piece by piece (see ``_PIECE``) through a cache keyed by the piece
        and the byte after it. The greedy walk over a piece alone is exact up to the first token start ``q``
        where ``piece[q:] + next_byte`` begins some vocab entry: only there could a longer
        token run past the piece. Those tokens are kept, and ``piece[q:]`` is carried into
        the next piece and tokenized again with it.
        """
        data = bytes(data)
        if len(data) < _SMALL:
            return self.encode_bytes_reference(data)
        return self._encode_pieces(data)

    def _encode_pieces(self, data: bytes) -> list[int]:
        keys = _PIECE_AND_NEXT.findall(data)           # piece + next byte; the last: piece
        last = keys.pop() if keys else b""
        cache, piece = self._cache, self._world_piece
        out: list[int] = []
        extend, get = out.extend, cache.get
        tail = b""
        for key in keys:
            if tail:
                key = tail + key
            hit = get(key)
            if hit is None:
                hit = piece(key[:-1], key[-1:])
                if len(key) <= _CACHE_PIECE_MAX:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[key] = hit
            ids, tail = hit
            extend(ids)
        # The last piece has no next byte, so its greedy walk is exact.
        extend(self.encode_bytes_reference(tail + last))
        return out

    def _world_piece(self, w: bytes, nb: bytes) -> tuple[list[int], bytes]:
        """(ids, tail): the exact greedy ids of ``w`` when followed by the byte ``nb``, up to
        the carried-over ``tail`` that must be tokenized together with what follows."""
        ids = self.encode_bytes_reference(w)
        if not nb:
            return ids, b""
        prefixes, tokens, q = _world_prefixes(self._file), self.tokens, 0
        for j, i in enumerate(ids):
            if len(w) - q < self.max_token_len and w[q:] + nb in prefixes:
                return ids[:j], w[q:]
            q += len(tokens[i])
        return ids, b""

    def encode_bytes_reference(self, data: bytes) -> list[int]:
        """Plain-Python greedy longest match (the ``RWKV_TOKENIZER`` table of the demos):
        for each 2-byte prefix, the token lengths that start with it, longest first."""
        get, cand = self._to_id.get, self._cand.get
        out: list[int] = []
        i, n = 0, len(data)
        while i < n:
            for L in cand(data[i:i + 2], ()):
                tid = get(data[i:i + L])
                if tid is not None:
                    # Near the end the slice may be shorter than L; it is then a shorter
                    # token and still the longest match.
                    out.append(tid)
                    i += L
                    break
            else:
                out.append(data[i] + 1)
                i += 1
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        tokens, ids = self.tokens, _as_int_list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < len(tokens):
            bad = [i for i in ids if not 0 <= i < len(tokens)]
            raise ValueError(f"world tokenizer: ids not in the vocab (0..{len(tokens) - 1}): "
                             f"{bad[:10]}")
        return b"".join([tokens[i] for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"type": "world"} if self.path is None else {"type": "world", "path": self.path}


# ---- Hugging Face tokenizer.json ---------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` via the ``tokenizers`` package (e.g. the GPT-NeoX
    ``20B_tokenizer.json`` of the RWKV-4 Pile models: vocab 50277)."""

    def __init__(self, path: PathLike):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:
            raise ImportError("HFTokenizer needs the Hugging Face `tokenizers` package: "
                              "pip install tokenizers") from e
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        try:
            self._tok = _HF.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception
            raise TokenizerError(f"{self.path}: not a valid Hugging Face tokenizer.json "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                 ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = pathlib.Path(self.path).name
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        # The byte-level decoder already maps broken UTF-8 to U+FFFD.
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes: byte-level BPE pieces are bytes, so a stream may split a character
        across ids and :class:`StreamDecoder` can join it again."""
        ids = _as_int_list(ids)
        if not self._byte_level:
            return self.decode(ids).encode("utf-8")
        table, out = _gpt2_byte_table(), bytearray()
        for i in ids:
            if i in self._added:
                out += self._added[i].encode("utf-8")
                continue
            piece = self._tok.id_to_token(i)
            if piece is None:
                raise ValueError(f"{self.name}: id {i} not in the vocab")
            out += bytes(table[c] for c in piece)
        return bytes(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "hf", "path": self.path}


@functools.cache
def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable bytes stand for themselves, the other 68 bytes
    for U+0100 onwards, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(rest)}}


# ---- selection -----------------------------------------------------------------------------

_SPEC_TYPES = ("bytes", "char", "world", "hf")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output (:class:`TokenizerError` if
    the dict is not one)."""
    kind = d.get("type") if isinstance(d, dict) else None
    try:
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "world":
            return WorldTokenizer(d.get("path"))
        if kind == "hf":
            return HFTokenizer(d["path"])
    except KeyError as e:
        raise TokenizerError(f"tokenizer spec of type {kind!r} lacks the {e.args[0]!r} "
                             "field") from None
    except TokenizerError:
        raise
    except (TypeError, ValueError, OSError) as e:
        raise TokenizerError(f"bad tokenizer spec {str(d)[:80]} ({e})") from None
    raise TokenizerError(f"unknown tokenizer type {kind!r}; expected "
                         f"{', '.join(_SPEC_TYPES)}")


def _from_file(path: pathlib.Path) -> Tokenizer:
    """A ``tokenizer.json`` (an rwkv-jax spec ``{"type": ...}`` as training writes it, or a
    Hugging Face tokenizer file) or a World vocabulary ``.txt``."""
    if path.suffix == ".txt":
        try:
            return WorldTokenizer(path)
        except (ValueError, SyntaxError, IndexError) as e:
            raise TokenizerError(f"{path}: not an RWKV World vocabulary ({e})") from None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
    if isinstance(d, dict) and "type" in d and "model" not in d:
        try:
            return tokenizer_from_dict(d)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        return HFTokenizer(path)
    raise TokenizerError(f"{path}: neither an rwkv-jax tokenizer spec ({{\"type\": ...}}) nor "
                         "a Hugging Face tokenizer.json")


def _infer(vocab_size: int | None) -> Tokenizer:
    if vocab_size == 256:
        return ByteTokenizer()
    if vocab_size == 65536:
        return WorldTokenizer()
    hint = (" (the GPT-NeoX 20B tokenizer of the RWKV-4 Pile models: pass the path to "
            "20B_tokenizer.json, e.g. from RWKV-LM)") if vocab_size in (50277, 50304) else ""
    raise TokenizerError(f"cannot infer a tokenizer for vocab_size={vocab_size}{hint}; "
                         f"choose one of {', '.join(TOKENIZER_CHOICES)}")


def resolve_tokenizer(spec: Any = None, *, model_path: PathLike | None = None,
                      vocab_size: int | None = None,
                      text: Callable[[], Iterable[str]] | Iterable[str] | None = None,
                      ) -> Tokenizer:
    """The tokenizer for ``spec``; the one resolver behind training data, CLI and inference.

    ``spec`` is one of:

    * ``"bytes"`` (or ``"byte"``), ``"world"``;
    * ``"char"``: a :class:`CharTokenizer` whose vocabulary is every character of ``text``
      (an iterable of strings, or a callable returning one, called only here);
    * a path to a ``tokenizer.json``: an rwkv-jax spec (``{"type": ...}``, what training
      writes into a run directory) or a Hugging Face tokenizer file; a ``.txt`` path is a
      World vocabulary file;
    * a directory (a run directory): its ``tokenizer.json``;
    * a ``to_dict()`` dict, or a tokenizer object (returned as it is);
    * ``None``: ``model_path``'s ``tokenizer.json`` when ``model_path`` is a directory that has
      one, else inferred from ``vocab_size`` (256 -> bytes, 65536 -> world).

    With ``vocab_size`` (the model's), a tokenizer with more ids than that is an error.

    Raises:
      TokenizerError: an unknown spec, a missing file, a malformed ``tokenizer.json`` (the
        message names the file), or a vocabulary larger than ``vocab_size``.
    """
    if spec is None:
        run_tok = None if model_path is None else pathlib.Path(model_path) / "tokenizer.json"
        if run_tok is not None and run_tok.is_file():
            tok = _from_file(run_tok)
        elif vocab_size is None:
            raise TokenizerError("no tokenizer given and no vocab_size to infer one from; "
                                 f"choose one of {', '.join(TOKENIZER_CHOICES)}")
        else:
            tok = _infer(vocab_size)
    elif isinstance(spec, dict):
        tok = tokenizer_from_dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        tok = _from_spec_string(os.fspath(spec), text)
    else:
        tok = spec  # a tokenizer object (anything with the Tokenizer interface)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise TokenizerError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids, the model only "
                             f"{vocab_size}")
    return tok


def _from_spec_string(spec: str, text) -> Tokenizer:
    if spec in ("bytes", "byte"):
        return ByteTokenizer()
    if spec == "world":
        return WorldTokenizer()
    if spec == "char":
        if text is None:
            raise TokenizerError("tokenizer 'char' builds its vocabulary from the training "
                                 "text; give the run directory (or its tokenizer.json) of a "
                                 "model trained with it instead")
        seen: set[str] = set()
        for piece in (text() if callable(text) else text):
            seen.update(piece)
        return CharTokenizer.from_text("".join(sorted(seen)))
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise TokenizerError(f"{p}: a directory without a tokenizer.json")
        return _from_file(p / "tokenizer.json")
    if p.is_file():
        return _from_file(p)
    if spec.endswith((".json", ".txt")) or os.sep in spec or "/" in spec:
        raise TokenizerError(f"tokenizer file not found: {spec}")
    raise TokenizerError(f"unknown tokenizer {spec!r}; choose one of "
                         f"{', '.join(TOKENIZER_CHOICES)}")


def get_tokenizer(spec: str | None, *, vocab_size: int | None = None) -> Tokenizer:
    """:func:`resolve_tokenizer` ``(spec, vocab_size=vocab_size)``, kept for existing callers."""
    return resolve_tokenizer(spec, vocab_size=vocab_size)


# ---- streaming decode ----------------------------------------------------------------------

class StreamDecoder:
    """Incremental decoding for generation: :meth:`feed` returns only complete UTF-8
    characters, holding back a trailing partial one until its other bytes arrive;
    :meth:`flush` returns what is left (a dangling partial becomes U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, (int, np.integer)) else ids
        return self._dec.decode(self.tokenizer.decode_bytes(_as_int_list(ids)))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
