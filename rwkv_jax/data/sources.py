"""Finding token data: :func:`open_tokens` picks the reader from what is on disk; text is
tokenized once and cached (:func:`open_text`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

import numpy as np

from rwkv_jax.data.cache import TokenizerLike, cached_prepare, tokenizer_spec
from rwkv_jax.data.chat import LOSS_ON
from rwkv_jax.data.corpus import open_stdlib_corpus
from rwkv_jax.data.files import TOKEN_SUFFIXES, DataError, PathLike, strip_suffix, with_suffix
from rwkv_jax.data.formats import TokenSource, read_binidx, read_prepared
from rwkv_jax.data.text import prepare
from rwkv_jax.tokenizers import resolve_tokenizer

__all__ = ["open_tokens", "open_text"]


def open_text(path: PathLike, tokenizer: TokenizerLike = "bytes", *,
              cache_dir: PathLike | None = None,
              doc_separator: int | None | Literal["auto"] = "auto",
              loss_on: Literal["all", "response"] = "all") -> TokenSource:
    """Tokenize a text or ``.jsonl`` file once (:func:`prepare`) and reuse the cached result.

    The cache entry is keyed by the absolute path, size, mtime, separator, ``loss_on`` and the
    tokenizer (``to_dict()``, or the spec string); a changed file or tokenizer makes a new
    entry. ``tokenizer`` may be any spec for :func:`rwkv_jax.tokenizers.resolve_tokenizer`;
    ``"char"`` builds the vocabulary from this file. ``cache_dir`` defaults to
    :func:`default_cache_dir`.
    """
    p = pathlib.Path(path).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sep": doc_separator,
           "loss_on": loss_on}
    tokenizer = tokenizer_spec(tokenizer)
    return cached_prepare(key, p.stem, tokenizer, cache_dir,
                          lambda prefix: prepare([p], prefix, tokenizer,
                                                 doc_separator=doc_separator, loss_on=loss_on))


def open_tokens(path: PathLike | None, tokenizer: TokenizerLike = None, *,
                cache_dir: PathLike | None = None, max_bytes: int | None = None,
                loss_on: Literal["all", "response"] | None = None) -> TokenSource:
    """Open whatever token data is at ``path``; ``None`` means the default corpus.

    * ``None``: :func:`rwkv_jax.data.open_stdlib_corpus` (``max_bytes`` caps it; it applies to
      nothing else).
    * ``name.bin``/``name.idx``/``name`` with ``name.bin`` and ``name.idx``: binidx. It records
      no tokenizer, so ``tokenizer`` must say which (a spec is resolved); the first 16M
      ids are checked against its vocabulary.
    * ``name.bin``/``name.json``/``name`` with ``name.json`` from :func:`prepare`: prepared;
      the stored tokenizer (and mask) is used. A Tokenizer object, if given, must match it; a
      spec string is ignored (it only says how to tokenize text).
    * any other file: text or ``.jsonl``, tokenized with ``tokenizer`` (default ``"bytes"``)
      and cached (:func:`open_text`).

    ``loss_on``: None (default) keeps what the data says (a prepared file's mask, if any; text
    is tokenized with ``"all"``). ``"all"``: every token is a target (a stored mask is
    dropped). ``"response"``: chat prompts are masked; text is tokenized so, and token data
    without a mask is an error.
    """
    if loss_on not in (None, *LOSS_ON):
        raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)} or None, got {loss_on!r}")
    src = _open(path, tokenizer_spec(tokenizer), cache_dir, max_bytes, loss_on or "all")
    if loss_on == "all" and src.mask is not None:
        return dataclasses.replace(src, mask=None)
    if loss_on == "response" and src.mask is None:
        raise DataError(f"{src.path or path or 'the default corpus'}: loss_on='response' needs a "
                        "loss mask, and these tokens have none; prepare chat records with "
                        "loss_on='response'")
    return src


def _open(path: PathLike | None, tokenizer: TokenizerLike, cache_dir: PathLike | None,
          max_bytes: int | None, loss_on: str) -> TokenSource:
    if path is None:
        return open_stdlib_corpus(tokenizer if tokenizer is not None else "bytes",
                                  max_bytes=max_bytes, cache_dir=cache_dir)
    p = pathlib.Path(path).expanduser()
    prefix = strip_suffix(p)
    has = lambda suffix: with_suffix(prefix, suffix).is_file()  # noqa: E731
    if p.suffix in TOKEN_SUFFIXES or not p.is_file():
        if has(".bin") and has(".idx") and p.suffix != ".json":
            return _open_binidx(prefix, tokenizer)
        if has(".json") and p.suffix != ".idx":
            return read_prepared(prefix, None if isinstance(tokenizer, str) else tokenizer)
        if not p.is_file():
            raise DataError(f"{path}: no such file (nor {prefix}.bin with .idx or .json)")
        if p.suffix == ".bin":
            raise DataError(f"{p}: a .bin without {prefix.name}.idx or {prefix.name}.json "
                            "beside it; its dtype is unknown")
    return open_text(p, tokenizer if tokenizer is not None else "bytes", cache_dir=cache_dir,
                     loss_on=loss_on)


def _open_binidx(prefix: pathlib.Path, tokenizer: TokenizerLike) -> TokenSource:
    b = read_binidx(prefix)
    bin_path = with_suffix(prefix, ".bin")
    offsets = b.doc_offsets()
    if tokenizer is None:
        return TokenSource(b.tokens, None, None, bin_path, "binidx", doc_offsets=offsets)
    if tokenizer == "char":
        raise DataError(f"{bin_path}: binidx tokens cannot use a 'char' tokenizer (its "
                        "vocabulary is built from text); name the tokenizer they were made with")
    tok = resolve_tokenizer(tokenizer)
    head = np.asarray(b.tokens[:1 << 24])  # a cheap check that catches the wrong tokenizer
    if head.size and int(head.max()) >= tok.vocab_size:
        raise DataError(f"{bin_path}: holds id {int(head.max())}, outside tokenizer "
                        f"{tok.name!r} (vocab_size {tok.vocab_size}); pass the tokenizer the "
                        "data was made with (RWKV-LM binidx is usually 'world' or 20B)")
    return TokenSource(b.tokens, tok, tok.to_dict(), bin_path, "binidx", doc_offsets=offsets)
