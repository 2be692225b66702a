"""The default corpus: the Python standard library's own source, zero downloads.

Each stdlib file is one document (so packed training sees whole files).
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import sys
import sysconfig

from rwkv_jax.data.cache import TokenizerLike, cached_prepare
from rwkv_jax.data.files import PathLike
from rwkv_jax.data.formats import TokenSource, TokenWriter, write_prepared
from rwkv_jax.data.text import encode_stream
from rwkv_jax.tokenizers import resolve_tokenizer

__all__ = ["STDLIB_SEPARATOR", "stdlib_files", "stdlib_documents", "stdlib_corpus",
           "open_stdlib_corpus"]

STDLIB_SEPARATOR = b"\n\n"
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                               "lib2to3", "__pycache__"})


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
    """``(relative posix path, full path)`` of the corpus's candidate files, sorted."""
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


def stdlib_documents(max_bytes: int | None = None) -> list[bytes]:
    """:func:`stdlib_corpus` as its documents: each file with the separator that follows it
    (the last file has none); joined, they are exactly ``stdlib_corpus(max_bytes)``."""
    docs, total = [], 0
    for _, full in stdlib_files():
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            data = full.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if docs:
            docs[-1] += STDLIB_SEPARATOR
            total += len(STDLIB_SEPARATOR)
        docs.append(data)
        total += len(data)
    if max_bytes is not None and total > max_bytes:
        cut = max(max_bytes, 0)
        flat = b"".join(docs)
        while 0 < cut < len(flat) and (flat[cut] & 0xC0) == 0x80:  # inside a UTF-8 sequence
            cut -= 1
        kept, pos = [], 0
        for d in docs:
            if pos + len(d) >= cut:
                if cut > pos:
                    kept.append(d[:cut - pos])
                break
            kept.append(d)
            pos += len(d)
        docs = kept
    return docs


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The standard library's ``.py`` sources, concatenated: the zero-download default corpus.

    Files under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``,
    ``dist-packages``, ``test``, ``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``
    directories and any file that cannot be read or is not UTF-8, in sorted relative-path
    order, joined by :data:`STDLIB_SEPARATOR`. Deterministic for a given Python install.
    ``max_bytes`` truncates the result (at a UTF-8 character boundary).
    """
    return b"".join(stdlib_documents(max_bytes))


def open_stdlib_corpus(tokenizer: TokenizerLike = "bytes", *, max_bytes: int | None = None,
                       cache_dir: PathLike | None = None) -> TokenSource:
    """:func:`stdlib_corpus` tokenized with ``tokenizer``, cached like
    :func:`rwkv_jax.data.open_text`, one document per file.

    Each document is tokenized on its own (ids equal tokenizing the whole text for byte and
    char tokenizers; for World the merges across a file boundary differ). The cache key covers
    the Python version, the stdlib path, ``max_bytes`` and a fingerprint of the file list
    (names, sizes, mtimes), so an updated install makes a new entry.
    """
    fp = hashlib.sha256()
    for rel, full in stdlib_files():
        try:
            st = full.stat()
        except OSError:
            continue
        fp.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = {"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version,
           "max_bytes": max_bytes, "files": fp.hexdigest()}

    def make(prefix: pathlib.Path) -> TokenSource:
        docs = [d.decode("utf-8") for d in stdlib_documents(max_bytes)]
        tok = resolve_tokenizer(tokenizer, text=lambda: docs)
        where = "<python stdlib>"

        def fill(w: TokenWriter) -> list[dict]:
            for doc in docs:
                encode_stream(io.StringIO(doc), w, tok, where)
                w.end_document()
            return [{"path": where, "bytes": sum(len(d.encode()) for d in docs),
                     "n_docs": len(docs), "n_tokens": w.count}]

        return write_prepared(prefix, tok, None, fill)

    return cached_prepare(key, "python-stdlib", tokenizer, cache_dir, make)
