"""The token cache: text is tokenized once into ``default_cache_dir()`` and reused by later runs,
keyed by everything the tokens depend on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

from rwkv_jax.data.files import DataError, PathLike, with_suffix
from rwkv_jax.data.formats import PREPARED_VERSION, TokenSource, read_prepared
from rwkv_jax.tokenizers import resolve_tokenizer

__all__ = ["default_cache_dir", "cached_prepare", "tokenizer_spec", "TokenizerLike",
           "CACHE_VERSION"]

TokenizerLike = Any  # a Tokenizer, a spec for resolve_tokenizer ("bytes", "char", a path), None
# Part of every cache key: bumped when the cached files gain something (2: document offsets).
CACHE_VERSION = 2


def default_cache_dir() -> pathlib.Path:
    """``$RWKV_JAX_CACHE/tokens``, else ``$XDG_CACHE_HOME/rwkv-jax/tokens``, else
    ``~/.cache/rwkv-jax/tokens``."""
    if os.environ.get("RWKV_JAX_CACHE"):
        return pathlib.Path(os.environ["RWKV_JAX_CACHE"]).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "rwkv-jax" / "tokens"


def tokenizer_spec(tokenizer: TokenizerLike) -> TokenizerLike:
    """A path-like spec as a string; anything else unchanged."""
    return os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer


def _cache_key(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tokenizer_key(tokenizer: TokenizerLike) -> Any:
    """What identifies a tokenizer in a cache key: its ``to_dict()``, or the spec string (with
    the size and mtime of the file it names: a ``tokenizer.json``, or a run directory's)."""
    if not isinstance(tokenizer, str):
        return tokenizer.to_dict()
    p = pathlib.Path(tokenizer).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file():
        st = p.stat()
        return {"spec": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"spec": tokenizer}


def cached_prepare(key_fields: dict, stem: str, tokenizer: TokenizerLike,
                   cache_dir: PathLike | None,
                   make: Callable[[pathlib.Path], TokenSource]) -> TokenSource:
    """The cache entry for ``key_fields`` + tokenizer, made by ``make(prefix)`` on a miss."""
    tokenizer = tokenizer_spec(tokenizer)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key_fields = {**key_fields, "tokenizer": _tokenizer_key(tokenizer),
                  "format": PREPARED_VERSION, "cache": CACHE_VERSION}
    prefix = cache / f"{stem}-{_cache_key(key_fields)}"
    if with_suffix(prefix, ".json").is_file():
        try:
            src = read_prepared(prefix, None if isinstance(tokenizer, str) else tokenizer)
        except DataError:
            src = None  # damaged entry: rebuild it below
        if src is not None:
            if src.tokenizer is None and isinstance(tokenizer, str) and tokenizer != "char":
                src = dataclasses.replace(src, tokenizer=resolve_tokenizer(tokenizer))
            return src
    return make(prefix)
