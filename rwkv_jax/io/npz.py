"""Read ``.npz`` archives (``numpy.savez``) lazily and within bounds, without ``np.load``.

``np.load`` allocates whatever each member's ``.npy`` header declares and inflates whatever
its deflate stream holds. Here the zip is opened first, each member's header is parsed
(cheap: a few hundred bytes), and the caller checks names, shapes and dtypes against what
it expects before :meth:`NpzReader.read` reads exactly the declared bytes of one member,
with the zip-bomb rules of :mod:`rwkv_jax.io.zipmember`. Object arrays are never read.
Every failure is a :class:`CheckpointError` naming the file and the member.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import describe, open_regular
from rwkv_jax.io.zipmember import inflate_problem, read_prefix

__all__ = ["NpzReader"]

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, SyntaxError,
           NotImplementedError, RuntimeError)


class NpzReader:
    """An open ``.npz``: ``shapes`` / ``dtypes`` by array name, then :meth:`read` one by one.

    Use as a context manager. Array names are the member names without ``.npy``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fh = open_regular(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {describe(e)}") from None
        try:
            self._zf = zipfile.ZipFile(self._fh)
            self._members: dict[str, tuple[zipfile.ZipInfo, tuple, bool, np.dtype]] = {}
            for info in self._zf.infolist():
                self._add(info)
        except CheckpointError:
            self.close()
            raise
        except _ERRORS as e:
            self.close()
            raise CheckpointError(f"{self.path}: not a readable .npz archive (truncated or "
                                  f"corrupt: {type(e).__name__}: {e})") from None
        self.shapes = {k: v[1] for k, v in self._members.items()}
        self.dtypes = {k: v[3] for k, v in self._members.items()}

    def _add(self, info: zipfile.ZipInfo) -> None:
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{self.path}: member '{info.filename:.100}' is not an "
                                  ".npy array")
        if problem := inflate_problem(info):
            raise CheckpointError(f"{self.path}: {problem}")
        with self._zf.open(info) as f:
            shape, fortran, dtype = self._header(f, info.filename)
        self._members[info.filename[:-4]] = (info, shape, fortran, dtype)

    def _header(self, f, member: str) -> tuple[tuple, bool, np.dtype]:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise CheckpointError(f"{self.path}: member '{member}' uses .npy format version "
                                  f"{version}, which is not read here")
        shape, fortran, dtype = _HEADER_READERS[version](f)
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: member '{member}' holds Python objects "
                                  "(refused: loading them would run pickle)")
        return shape, fortran, dtype

    def read(self, name: str) -> np.ndarray:
        """The array ``name``: exactly the bytes its header declares, read into memory."""
        info, shape, fortran, dtype = self._members[name]
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            with self._zf.open(info) as f:
                self._header(f, info.filename)
                raw = read_prefix(f, nbytes, f"member '{info.filename}'")
        except CheckpointError:
            raise
        except _ERRORS as e:
            raise CheckpointError(f"{self.path}: member '{info.filename}' is truncated or "
                                  f"corrupt ({type(e).__name__}: {e})") from None
        return raw.view(dtype).reshape(shape, order="F" if fortran else "C")

    def close(self) -> None:
        if getattr(self, "_zf", None) is not None:
            self._zf.close()
        self._fh.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
