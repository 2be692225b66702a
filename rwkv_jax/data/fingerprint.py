"""A data fingerprint, recorded in a run directory and compared on resume.

:func:`fingerprint` summarises the token data a run trains on: the token file's size and
mtime, SHA-256 of its first and last MiB, the token count and dtype, the tokenizer spec and, when
present, the same for the loss mask and the document count. It is JSON-serialisable and the
same in every process that opens the same data. :func:`fingerprint_diff` lists what changed;
only the :data:`CONTENT_KEYS` mean the tokens differ (a rebuilt cache or a copied file has a
new ``mtime_ns``/``path`` but the same content).
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import numpy as np

from rwkv_jax.data.files import DataError, PathLike, as_json, strip_suffix, with_suffix
from rwkv_jax.data.formats import TokenSource
from rwkv_jax.data.pack import document_offsets
from rwkv_jax.data.sources import open_tokens

__all__ = ["fingerprint", "fingerprint_diff", "FINGERPRINT_VERSION", "CONTENT_KEYS"]

FINGERPRINT_VERSION = 1
_MIB = 1 << 20
CONTENT_KEYS = ("version", "size", "head_sha256", "tail_sha256", "n_tokens", "dtype",
                "tokenizer", "mask", "n_docs")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_part(path: pathlib.Path) -> dict:
    st = path.stat()
    with open(path, "rb") as f:
        head = f.read(_MIB)
        f.seek(max(0, st.st_size - _MIB))
        tail = f.read(_MIB)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": _sha(head), "tail_sha256": _sha(tail)}


def _array_part(arr: np.ndarray) -> dict:
    """The same fields for an in-memory array (no path, no mtime)."""
    a = np.ascontiguousarray(arr)
    step = max(1, _MIB // max(a.itemsize, 1))
    return {"path": None, "size": int(a.nbytes), "mtime_ns": None,
            "head_sha256": _sha(a[:step].tobytes()), "tail_sha256": _sha(a[-step:].tobytes())}


def fingerprint(data: PathLike | TokenSource) -> dict[str, Any]:
    """The fingerprint of a :class:`TokenSource` or of the data at a path.

    For a source read from a file (prepared, binidx, a text cache entry) the file part is its
    ``.bin`` as a whole, so a source sliced by :func:`split_source` has its parent's file
    fields and its own ``n_tokens``; take the fingerprint of the source as opened. A path to
    a prepared or binidx file is opened (no tokenization); any other file (text) is
    fingerprinted as bytes, with ``n_tokens``, ``dtype`` and ``tokenizer`` None.

    Returns:
      ``{"version", "format", "path", "size", "mtime_ns", "head_sha256", "tail_sha256",
      "n_tokens", "dtype", "tokenizer", "mask", "n_docs"}``; ``mask`` is None or
      ``{"head_sha256", "tail_sha256"}`` of the loss mask.
    """
    if not isinstance(data, TokenSource):
        p = pathlib.Path(data).expanduser()
        prefix = strip_suffix(p)
        if any(with_suffix(prefix, s).is_file() for s in (".json", ".idx")) and (
                with_suffix(prefix, ".bin").is_file()):
            data = open_tokens(p)
        elif p.is_file():
            return {"version": FINGERPRINT_VERSION, "format": "file", **_file_part(p),
                    "n_tokens": None, "dtype": None, "tokenizer": None, "mask": None,
                    "n_docs": None}
        else:
            raise DataError(f"{p}: no such file")
    src = data
    if src.path is not None and pathlib.Path(src.path).is_file():
        part = _file_part(pathlib.Path(src.path))
    else:
        part = _array_part(src.tokens)
    mask = None
    if src.mask is not None:
        m = _array_part(np.asarray(src.mask))
        mask = {"head_sha256": m["head_sha256"], "tail_sha256": m["tail_sha256"]}
    spec = src.tokenizer_spec
    if spec is None and src.tokenizer is not None:
        spec = src.tokenizer.to_dict()
    n_docs = int(document_offsets(src).shape[0]) - 1 if (
        src.doc_offsets is not None or src.doc_separator is None) else None
    return as_json({"version": FINGERPRINT_VERSION, "format": src.format, **part,
                    "n_tokens": len(src), "dtype": np.dtype(src.tokens.dtype).name,
                    "tokenizer": spec, "mask": mask, "n_docs": n_docs})


def fingerprint_diff(recorded: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, current)}`` for every key whose value differs (a key missing on one
    side counts as None). The data changed if any of them is in :data:`CONTENT_KEYS`."""
    keys = sorted(set(recorded) | set(current))
    return {k: (recorded.get(k), current.get(k)) for k in keys
            if as_json(recorded.get(k)) != as_json(current.get(k))}
