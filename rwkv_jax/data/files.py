"""What every data module shares: the error type and safe file handling.

Writes are atomic: a file is written to a temporary beside its final name and renamed into
place, so a reader never sees half a file (:func:`temp_path`, :func:`write_json_atomic`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from rwkv_jax.io.files import temp_path, write_text_atomic

__all__ = ["DataError", "PathLike", "TOKEN_SUFFIXES", "with_suffix", "strip_suffix",
           "temp_path", "write_json_atomic", "memmap_or_empty", "as_json", "open_text_file"]

PathLike = str | os.PathLike

# Suffixes that name a token file by its prefix (prepared .bin/.json, binidx .bin/.idx).
TOKEN_SUFFIXES = (".bin", ".idx", ".json")


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file."""


def with_suffix(prefix: pathlib.Path, suffix: str) -> pathlib.Path:
    """``prefix`` + ``suffix`` (appended: ``a.b`` + ``.bin`` is ``a.b.bin``)."""
    return prefix.with_name(prefix.name + suffix)


def strip_suffix(p: pathlib.Path) -> pathlib.Path:
    """The prefix of a token file: ``name.bin``/``.idx``/``.json`` -> ``name``."""
    return p.with_suffix("") if p.suffix in TOKEN_SUFFIXES else p


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def memmap_or_empty(path: pathlib.Path, dtype: np.dtype, offset: int = 0) -> np.ndarray:
    """A read-only memmap of ``path`` as ``dtype``; an empty file gives an empty array
    (np.memmap refuses zero-length maps, but an empty token file is valid)."""
    if path.stat().st_size - offset == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset)


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing specs."""
    return json.loads(json.dumps(obj))


def open_text_file(path: pathlib.Path):
    """Open UTF-8 text keeping the file's line endings exactly (``newline=""``: lossless, like
    reading bytes)."""
    return open(path, encoding="utf-8", newline="")
