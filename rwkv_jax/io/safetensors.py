"""Read ``.safetensors`` files into numpy, checking the header against the file first.

Format: an unsigned little-endian 64-bit header length ``n``, ``n`` bytes of UTF-8 JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` (offsets relative to the byte buffer after the header), then the buffer.

Every claim in the header is checked before any tensor is touched, and every failure is one
:class:`CheckpointError` naming the file and the tensor: a known dtype numpy can hold (F8/F6/F4
and complex dtypes are refused by name), a shape of non-negative ints, ``end - begin`` equal
to ``prod(shape) * itemsize``, and the tensors tiling the buffer exactly (no gaps, overlaps or
bytes past the end: the rule of the reference implementation). Memory is therefore bounded by
the file size; with ``mmap`` the tensors are copy-on-write views of the mapped file and
nothing is read until used.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import describe, open_regular

__all__ = ["MAX_HEADER_BYTES", "read_safetensors"]

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16).newbyteorder("<"),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
}
# Valid safetensors dtypes that rwkv-jax does not load (no RWKV checkpoint uses them).
_REFUSED = {"F8_E4M3": "float8", "F8_E5M2": "float8", "F8_E8M0": "float8 scale",
            "F6_E2M3": "float6", "F6_E3M2": "float6", "F4": "float4", "C64": "complex"}


def _bad(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable .safetensors file: {detail}")


def _pairs_no_duplicates(path: str):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _bad(path, f"header names {k!r:.80} twice")
            seen.add(k)
        return dict(pairs)
    return hook


def _entry(path: str, name: str, spec) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or CheckpointError naming it."""
    where = f"tensor {name!r:.100}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"{where}: header entry must have exactly dtype, shape, data_offsets")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if code in _REFUSED:
        raise _bad(path, f"{where} has dtype {code} ({_REFUSED[code]}), which rwkv-jax does "
                   f"not load; convert it to BF16, F16 or F32")
    if not isinstance(code, str) or code not in _DTYPES:
        raise _bad(path, f"{where} has unknown dtype {code!r:.40}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise _bad(path, f"{where} has malformed shape {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int for n in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"{where} has malformed data_offsets {offsets!r:.80}")
    dtype = _DTYPES[code]
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _bad(path, f"{where}: shape {shape} of {code} needs "
                   f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets [{begin}, {end}] "
                   f"hold {end - begin}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike, *, mmap: bool = True
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (in header order) and the ``__metadata__`` of a ``.safetensors`` file.

    Arrays are native byte order; with ``mmap`` they are writable copy-on-write views of the
    file (the file never changes), else they are read into memory.

    Raises:
      CheckpointError: unreadable (missing, permission, not a regular file), truncated, a
        malformed or inconsistent header, or an unsupported dtype; the message names the
        file and the tensor.
    """
    path_s = os.fspath(path)
    try:
        fh = open_regular(path_s)
    except OSError as e:
        raise CheckpointError(f"{path_s}: cannot read: {describe(e)}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path_s, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path_s, f"header length {n} exceeds the file ({size} bytes) or the "
                       f"{MAX_HEADER_BYTES}-byte limit (truncated?)")
        try:
            header = json.loads(fh.read(n).decode("utf-8"),
                                object_pairs_hook=_pairs_no_duplicates(path_s))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise _bad(path_s, f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise _bad(path_s, f"header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", {})
        if not (isinstance(metadata, dict)
                and all(isinstance(v, str) for v in metadata.values())):
            raise _bad(path_s, "__metadata__ must map strings to strings")
        entries = {name: _entry(path_s, name, spec) for name, spec in header.items()}

        buffer = size - 8 - n
        pos = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
            if begin != pos:
                raise _bad(path_s, f"tensor {name!r:.100} data_offsets [{begin}, {end}] "
                           f"{'overlap the previous tensor' if begin < pos else 'leave a gap'}"
                           f" (expected to start at {pos})")
            pos = end
        if pos != buffer:
            why = "truncated" if pos > buffer else "extra bytes"
            raise _bad(path_s, f"the tensors cover {pos} bytes of data but the file holds "
                       f"{buffer} after the header ({why})")

        start = 8 + n
        if mmap and buffer:
            # Copy-on-write: callers may modify the arrays; asarray drops the memmap subclass.
            data = np.asarray(np.memmap(fh, dtype=np.uint8, mode="c"))[start:]
        else:
            data = np.empty(buffer, np.uint8)
            fh.seek(start)
            if fh.readinto(memoryview(data)) != buffer:
                raise _bad(path_s, "file shrank while being read")
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        arr = data[begin:end].view(dtype).reshape(shape)
        if not dtype.isnative and dtype.itemsize > 1:
            arr = arr.astype(dtype.newbyteorder("="))  # big-endian host
        tensors[name] = arr
    return tensors, dict(metadata)
