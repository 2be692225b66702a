"""Read and write PyTorch ``.pth`` checkpoints without importing torch.

Format (the zip format, ``torch.save``'s default since torch 1.6). A zip archive whose
members all live under one folder ``<prefix>/``:

- ``data.pkl``: a pickle (protocol 2) of the saved object. Each tensor is pickled as
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
  where ``storage`` is a *persistent id*
  ``('storage', torch.<Dtype>Storage, key, location, numel)`` resolved by the loader.
- ``data/<key>``: the raw bytes of each storage, stored uncompressed (ZIP_STORED) and
  64-byte aligned (the local header's extra field is padded so the data starts on a
  multiple of 64, which makes memory-mapping cheap).
- ``byteorder`` (``little``/``big``; absent means little), ``version`` (``3``), and in
  newer files ``.format_version``, ``.storage_alignment``, ``.data/serialization_id``.

A tensor is ``storage[offset:]`` viewed with ``size`` and ``stride`` (both in elements).

Resource contract of :func:`read_pth`: memory stays proportional to the bytes the tensors
really address. Every tensor's geometry is checked against its storage before anything is
read: a view that repeats storage elements (a zero or overlapping stride) is refused, so a
tensor is never larger than its storage; each storage's declared size must fit its zip
member; only the addressed prefix of a member is read (or inflated); compressed members
with an absurd ratio are refused (:mod:`rwkv_jax.io.zipmember`); and strided/byte-swapped
copies may total at most :data:`_MAX_COPY_FACTOR` times the storage bytes they read.

Security contract of :func:`read_pth`. Unpickling runs code named by the pickle, so the
reader never hands a name to Python's import machinery: :class:`_RestrictedUnpickler`
maps the few globals a tensor state dict needs (the tensor rebuild functions,
``collections.OrderedDict`` and the storage type names) to inert stand-ins defined in this
module, and refuses every other global (``os.system``, ``builtins.eval``, ...) with a
:class:`CheckpointError` *before* anything is called. The stand-ins only record their
arguments; tensors are built from the zip afterwards, once the pickle has been accepted
and its structure checked. torch is never imported.

:func:`write_pth` emits the same format (pickle opcodes written by hand, since the torch
globals cannot be pickled without torch) so that ``torch.load(path, weights_only=True)``
loads it. Every failure surfaces as :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import atomic_path, describe, open_regular
from rwkv_jax.io.zipmember import crc_problems, data_offset, inflate_problem, read_prefix

__all__ = ["CheckpointError", "read_pth", "verify_pth", "write_pth"]


# torch storage type name <-> numpy dtype (native byte order).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES: dict[np.dtype, str] = {dt: name for name, dt in _STORAGE_DTYPES.items()}

_ALIGNMENT = 64  # torch's PyTorchStreamWriter aligns every record's data to 64 bytes
_LOCAL_HEADER_SIG = b"PK\x03\x04"
_MAX_NDIM = 32
# Strided and byte-swapped tensors are copied. Views never overlap themselves (refused), but
# many views may share one storage; copies beyond this many times the storage bytes read
# can only come from views overlapping each other (tied weights give 2x).
_MAX_COPY_FACTOR = 4


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


class _Inert:
    """Base of the stand-ins: the pickle BUILD opcode (set attributes) is refused on them.

    Without this a pickle could BUILD onto the shared stand-ins in :data:`_ALLOWED_GLOBALS`
    and change how later files are read.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__} is not allowed")


class _StorageType(_Inert):
    """Stand-in for ``torch.<Dtype>Storage``: a dtype tag, deliberately not callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _StorageRef(_Inert):
    """A storage named by the pickle: ``numel`` elements of ``dtype`` in ``data/<key>``."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef(_Inert):
    """What a rebuild call in the pickle stands for; materialized after unpickling."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(type(v) is int for v in x)


class _RebuildTensor(_Inert):
    """Stand-in for ``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2``.

    The extra v2 arguments (requires_grad, backward_hooks, metadata) are irrelevant here.
    """

    __slots__ = ()

    def __call__(self, storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        if type(storage_offset) is not int or not (_is_int_tuple(size) and _is_int_tuple(stride)):
            raise pickle.UnpicklingError("tensor offset/size/stride are not integers")
        if (len(size) != len(stride) or len(size) > _MAX_NDIM or storage_offset < 0
                or min(size + stride, default=0) < 0 or max(size + stride, default=0) >= 1 << 62):
            raise pickle.UnpicklingError(f"bad tensor geometry size={size!r:.80} "
                                         f"stride={stride!r:.80}")
        return _TensorRef(storage, storage_offset, size, stride)


class _RebuildParameter(_Inert):
    """Stand-in for ``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is its data."""

    __slots__ = ()

    def __call__(self, data, requires_grad=False, backward_hooks=None) -> _TensorRef:
        if not isinstance(data, _TensorRef):
            raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
        return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor(),
    ("torch._utils", "_rebuild_tensor"): _RebuildTensor(),
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    # A class, not a stand-in: BUILD cannot set attributes on a built-in type.
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Untyped storages count bytes; torch never rebuilds tensors from them in state dicts.
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", n): _StorageType(n, dt) for n, dt in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_ALLOWED_GLOBALS`, and storages by key.

    ``find_class`` is the single door through which a pickle reaches Python objects
    (GLOBAL, STACK_GLOBAL, INST, OBJ and EXT opcodes all go through it), so refusing here
    means no refused name is ever imported or called.
    """

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refused global '{module}.{name}' in data.pkl; only tensor "
                "state dicts are loaded (the file may be malicious or not a plain checkpoint)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r:.80}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage id {pid!r:.80}")
        return _StorageRef(key, storage_type.dtype, numel)


def _sniff_non_zip(head: bytes, size: int) -> str:
    """Describe why a file that zipfile rejects is not a readable .pth checkpoint."""
    if size == 0:
        return "file is empty"
    if head.startswith(_LOCAL_HEADER_SIG):
        return "zip archive is truncated or corrupt (no readable central directory)"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < size:
            return ("looks like a .safetensors file, not a PyTorch checkpoint "
                    "(load it with the safetensors reader)")
    if head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"):
        return ("is a legacy (pre-1.6, non-zip) PyTorch checkpoint; re-save it with "
                "torch>=1.6 (torch.save default) to convert")
    return "is not a zip-format PyTorch checkpoint"


class _Archive:
    """The zip side of a checkpoint: member lookup and raw storage bytes."""

    def __init__(self, path: str, zf: zipfile.ZipFile, fh, mmap: bool):
        self.path, self.zf, self.fh = path, zf, fh
        self.file_size = os.fstat(fh.fileno()).st_size
        names = zf.namelist()
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkls:
            raise CheckpointError(
                f"{path}: zip archive has no '<prefix>/data.pkl' record; truncated/corrupt "
                "or not a PyTorch checkpoint"
            )
        self.prefix = pkls[0][: -len("data.pkl")]
        self._map = None
        if mmap and self.file_size:
            # Copy-on-write: callers may modify the arrays; the file never changes.
            # asarray drops the memmap subclass; the view keeps the mapping alive.
            self._map = np.asarray(np.memmap(fh, dtype=np.uint8, mode="c"))

    def read(self, record: str) -> bytes | None:
        try:
            return self.zf.read(self.prefix + record)
        except KeyError:
            return None

    def storage_info(self, key: str, declared: int) -> zipfile.ZipInfo:
        """The member of storage ``key``, checked to hold the ``declared`` bytes the pickle
        claims and (if compressed) not to be a zip bomb; nothing is read."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self.path}: storage record '{name}' is missing (truncated/corrupt file)"
            ) from None
        if info.file_size < declared:
            raise CheckpointError(
                f"{self.path}: storage '{name}' is truncated/corrupt: it holds "
                f"{info.file_size} bytes but the pickle needs {declared}"
            )
        if problem := inflate_problem(info):
            raise CheckpointError(f"{self.path}: {problem}")
        return info

    def storage_bytes(self, info: zipfile.ZipInfo, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of a storage member as a uint8 array (a view when mapped)."""
        if self._map is not None and info.compress_type == zipfile.ZIP_STORED:
            start = data_offset(self.fh, info)
            if start + info.file_size > self.file_size:
                raise CheckpointError(
                    f"{self.path}: storage '{info.filename}' runs past the end of the file "
                    "(truncated)"
                )
            # No CRC check here: it would read every page, which mapping exists to avoid
            # (read_pth(verify=True) checks them all).
            return self._map[start : start + nbytes]
        # Compressed member or mmap=False: inflate/read only the addressed prefix into a
        # writable buffer; zipfile checks the CRC when the read reaches the member's end.
        with self.zf.open(info) as src:
            return read_prefix(src, nbytes, f"storage '{info.filename}'")


def _extent(path: str, name: str, ref: _TensorRef) -> int:
    """Storage elements the tensor addresses (offset + 1 + span; 0 when empty).

    Refuses views that repeat elements: sorted by stride, each dimension of size > 1 must
    step past everything the smaller-strided dimensions reach. That also makes the tensor no
    larger than its extent, hence than its storage (a 613-byte file cannot ask for 64 GiB).
    """
    if math.prod(ref.size) == 0:
        return 0
    span = 0
    for s, n in sorted((s, n) for n, s in zip(ref.size, ref.stride) if n > 1):
        if s <= span:
            raise CheckpointError(
                f"{path}: tensor '{name}' is an overlapping view (size {ref.size}, stride "
                f"{ref.stride}): a zero or overlapping stride repeats storage elements "
                "and could ask for far more memory than the file holds; refused"
            )
        span += (n - 1) * s
    extent = ref.offset + span + 1
    if extent > ref.storage.numel:
        raise CheckpointError(
            f"{path}: tensor '{name}' needs {extent} elements of storage "
            f"'{ref.storage.key}', which holds {ref.storage.numel} (truncated/corrupt)"
        )
    return extent


def _storages(archive: _Archive, refs: dict[str, _TensorRef], swap: bool
              ) -> dict[tuple[str, np.dtype], np.ndarray]:
    """Check every tensor against its storage, then read the addressed part of each storage.

    Everything is checked before anything is read or allocated.
    """
    path = archive.path
    needed: dict[tuple[str, np.dtype], int] = {}  # bytes the tensors address
    declared: dict[tuple[str, np.dtype], int] = {}  # bytes the pickle says the storage has
    copies = []  # (tensor, bytes) of tensors that will be copied
    for name, ref in refs.items():
        st = ref.storage
        k = (st.key, st.dtype)
        extent = _extent(path, name, ref)
        needed[k] = max(needed.get(k, 0), extent * st.dtype.itemsize)
        declared[k] = max(declared.get(k, 0), st.numel * st.dtype.itemsize)
        if extent and (swap or ref.stride != _contiguous_strides(ref.size)):
            copies.append((name, math.prod(ref.size) * st.dtype.itemsize))
    budget, copied = _MAX_COPY_FACTOR * sum(needed.values()), 0
    for name, nbytes in copies:
        copied += nbytes
        if copied > budget:
            raise CheckpointError(
                f"{path}: tensor '{name}' brings the strided/byte-swapped copies to {copied} "
                f"bytes, over {_MAX_COPY_FACTOR}x the {budget // _MAX_COPY_FACTOR} storage "
                "bytes they view (views overlapping one another); refused"
            )
    infos = {k: archive.storage_info(k[0], declared[k]) for k in needed}
    return {k: archive.storage_bytes(infos[k], needed[k]).view(k[1]) for k in needed}


def _materialize(ref: _TensorRef, flat: np.ndarray, swap: bool) -> np.ndarray:
    """Build one tensor: typed 1-D storage prefix -> (strided) view of ``size``.

    The geometry was checked by :func:`_extent`.
    """
    dtype = ref.storage.dtype
    numel = math.prod(ref.size)
    if numel:
        contiguous = ref.stride == _contiguous_strides(ref.size)
        if contiguous:
            arr = flat[ref.offset : ref.offset + numel].reshape(ref.size)
        else:
            base = flat[ref.offset :]
            strides = tuple(s * dtype.itemsize for s in ref.stride)
            arr = np.lib.stride_tricks.as_strided(base, ref.size, strides, writeable=False)
            arr = arr.copy()  # own the data: no aliasing across tensors, no odd strides
    else:
        arr = np.empty(ref.size, dtype)
    if swap:
        arr = arr.byteswap()  # copies into native order (flat was viewed as native)
    return arr


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """torch's contiguous strides (in elements); size-0/1 dims count as 1, like torch."""
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _state_dict(path: str, obj: Any) -> dict[str, _TensorRef]:
    """The str -> tensor mapping in ``obj``; ``{'state_dict' or 'model': ...}`` is unwrapped."""

    def is_sd(x: Any) -> bool:
        return isinstance(x, dict) and all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in x.items()
        )

    if is_sd(obj):
        return obj
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and is_sd(obj.get(wrapper)):
            return obj[wrapper]
    if isinstance(obj, dict):
        bad = next(
            (k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _TensorRef))),
            None,
        )
        detail = f"entry {bad!r:.60} is not a str -> tensor item"
    else:
        detail = f"top-level object is a {type(obj).__name__}"
    raise CheckpointError(f"{path}: not a state dict ({detail})")


def _open_zip(path_s: str):
    """(file, ZipFile) of a regular file, or CheckpointError saying what the file is."""
    try:
        fh = open_regular(path_s)
    except OSError as e:
        raise CheckpointError(f"{path_s}: cannot open checkpoint: {describe(e)}") from e
    try:
        return fh, zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(0)
        reason = _sniff_non_zip(fh.read(16), size)
        fh.close()
        raise CheckpointError(f"{path_s}: {reason}") from e
    except BaseException:
        fh.close()
        raise


def verify_pth(path: str | os.PathLike) -> list[str]:
    """The CRC-32 problems of a ``.pth``'s zip members, one line each; ``[]`` when intact.

    Reads the whole file once (bounded memory; bomb-like members are reported, not
    inflated). Raises :class:`CheckpointError` when the file is not a readable zip at all.
    """
    path_s = os.fspath(path)
    fh, zf = _open_zip(path_s)
    with fh, zf:
        return crc_problems(zf)


def read_pth(path: str | os.PathLike, *, mmap: bool = True, verify: bool = False
             ) -> dict[str, np.ndarray]:
    """Load a zip-format PyTorch checkpoint's state dict as numpy arrays, without torch.

    Args:
      path: the ``.pth``/``.pt``/``.bin`` file written by ``torch.save``.
      mmap: memory-map the file (copy-on-write) so contiguous tensors are views of it and
        nothing is read until used; storage CRCs are then not verified. ``False`` reads
        the bytes the tensors address into memory (CRC-checked when that is the whole
        member, as in every file torch writes).
      verify: first check the CRC-32 of every zip member (one streaming pass over the
        file), so a flipped byte in a mapped storage is caught.

    Returns:
      ``{name: array}`` in file order, native byte order, dtypes float32/float64/float16/
      ``ml_dtypes.bfloat16``/int64/int32/int16/int8/uint8/bool. A top-level dict holding
      the weights under ``'state_dict'`` or ``'model'`` is unwrapped.

    Raises:
      CheckpointError: the file is absent, unreadable, not a regular file, empty, not a zip
        checkpoint (e.g. a ``.safetensors`` or legacy torch file), truncated or corrupt
        (including a failed ``verify``), not a state dict, a tensor geometry that does not
        fit its storage or repeats elements, a zip bomb, or a pickle that names a global
        outside the allow-list (nothing from it is run).
    """
    path_s = os.fspath(path)
    fh, zf = _open_zip(path_s)
    with fh:
        try:
            with zf:
                if verify and (problems := crc_problems(zf)):
                    raise CheckpointError(
                        f"{path_s}: CRC verification failed (corrupt file):\n  "
                        + "\n  ".join(problems)
                    )
                return _read_archive(_Archive(path_s, zf, fh, mmap), path_s)
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError, ValueError,
                RuntimeError, NotImplementedError) as e:
            # CRC mismatches, bad local headers, short reads, mmap failures, encrypted or
            # unsupported-compression members.
            raise CheckpointError(f"{path_s}: truncated/corrupt checkpoint: {e}") from e


def _read_archive(archive: _Archive, path: str) -> dict[str, np.ndarray]:
    pkl = archive.read("data.pkl")
    if pkl is None:  # pragma: no cover - _Archive already checked it is listed
        raise CheckpointError(f"{path}: data.pkl is missing (truncated/corrupt)")
    byteorder = (archive.read("byteorder") or b"little").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(pkl), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside a hostile/corrupt pickle
        raise CheckpointError(
            f"{path}: data.pkl is corrupt or not a tensor checkpoint: "
            f"{type(e).__name__}: {e}"
        ) from e
    refs = _state_dict(path, obj)
    swap = byteorder != sys.byteorder
    flats = _storages(archive, refs, swap)
    return {name: _materialize(ref, flats[(ref.storage.key, ref.storage.dtype)], swap)
            for name, ref in refs.items()}


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


class _PickleEmitter:
    """Writes the protocol-2 opcodes of a ``{name: tensor}`` dict as ``torch.save`` does."""

    def __init__(self):
        self.out = bytearray(pickle.PROTO + bytes([2]))

    def op(self, code: bytes) -> None:
        self.out += code

    def text(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    def integer(self, n: int) -> None:
        if 0 <= n < 1 << 8:
            self.out += pickle.BININT1 + struct.pack("<B", n)
        elif 0 <= n < 1 << 16:
            self.out += pickle.BININT2 + struct.pack("<H", n)
        elif -(1 << 31) <= n < 1 << 31:
            self.out += pickle.BININT + struct.pack("<i", n)
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += pickle.LONG1 + struct.pack("<B", len(data)) + data

    def global_(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.op(pickle.MARK)
        for v in values:
            self.integer(v)
        self.op(pickle.TUPLE)

    def tensor(
        self,
        key: str,
        storage_type: str,
        numel: int,
        shape: tuple[int, ...],
        offset: int = 0,
        stride: tuple[int, ...] | None = None,
    ) -> None:
        """``_rebuild_tensor_v2(<storage>, offset, shape, stride, False, OrderedDict())``.

        ``stride`` defaults to the contiguous one; the writer always uses the defaults.
        """
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        # persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)
        self.op(pickle.MARK)
        self.text("storage")
        self.global_("torch", storage_type)
        self.text(key)
        self.text("cpu")
        self.integer(numel)
        self.op(pickle.TUPLE)
        self.op(pickle.BINPERSID)
        self.integer(offset)
        self.int_tuple(shape)
        self.int_tuple(_contiguous_strides(shape) if stride is None else stride)
        self.op(pickle.NEWFALSE)  # requires_grad
        self.global_("collections", "OrderedDict")  # backward hooks: empty
        self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.REDUCE)
        self.op(pickle.TUPLE)
        self.op(pickle.REDUCE)

    def state_dict(self, entries: list[tuple[str, str, int, tuple[int, ...]]]) -> bytes:
        """``{name: tensor}`` from (name, storage type, numel, shape); storage key = index."""
        self.op(pickle.EMPTY_DICT)
        if entries:
            self.op(pickle.MARK)
            for i, (name, storage_type, numel, shape) in enumerate(entries):
                self.text(name)
                self.tensor(str(i), storage_type, numel, shape)
            self.op(pickle.SETITEMS)
        self.op(pickle.STOP)
        return bytes(self.out)


def _padding_extra(offset: int, name: str, zip64: bool) -> bytes:
    """Extra field making the data of a record whose header starts at ``offset`` 64-aligned.

    Mirrors torch's writer: one field with id ``FB`` filled with ``Z``. Python's zipfile
    appends a 20-byte zip64 field after ours when the member is large; that is counted.
    """
    fixed = offset + 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
    pad = -(fixed + 4) % _ALIGNMENT  # 4 = the field's own id + length
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad


def _as_storable(name: Any, value: Any, path: str) -> tuple[np.ndarray, str]:
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: tensor names must be str, got {name!r:.60}")
    arr = np.asarray(value)
    native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in "=|" else arr.dtype
    storage_type = _DTYPE_STORAGES.get(native)
    if storage_type is None:
        raise CheckpointError(
            f"{path}: tensor '{name}' has dtype {arr.dtype}, which a .pth cannot hold here "
            f"(supported: {', '.join(str(d) for d in _DTYPE_STORAGES)})"
        )
    # Little-endian, C-contiguous bytes; the file's byteorder record says "little".
    arr = np.asarray(arr, dtype=native.newbyteorder("<"), order="C")
    return arr, storage_type


def write_pth(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``tensors`` as a zip-format ``.pth`` that ``torch.load`` reads.

    Each array becomes one contiguous little-endian storage (64-byte aligned, stored
    uncompressed) and the pickle is a plain ``dict`` of ``_rebuild_tensor_v2`` calls, so
    ``torch.load(path, weights_only=True)`` accepts it. The file is written next to
    ``path`` and renamed into place, so a failed write leaves no partial checkpoint.

    Raises:
      CheckpointError: a name is not a str or a dtype has no torch storage type.
    """
    path_s = os.fspath(path)
    arrays = [(name, *_as_storable(name, value, path_s)) for name, value in tensors.items()]
    entries = [(name, st, arr.size, arr.shape) for name, arr, st in arrays]
    pkl = _PickleEmitter().state_dict(entries)

    with atomic_path(path_s) as tmp:
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:

            def record(name: str, data: bytes | np.ndarray) -> None:
                full = f"archive/{name}"
                nbytes = data.nbytes if isinstance(data, np.ndarray) else len(data)
                info = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
                info.file_size = nbytes
                # zipfile adds a zip64 field to the local header exactly when this holds.
                zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
                info.extra = _padding_extra(fh.tell(), full, zip64)
                with zf.open(info, "w") as dest:
                    if isinstance(data, np.ndarray):
                        data = data.reshape(-1).view(np.uint8)  # bf16 has no buffer format
                    dest.write(data)

            record("data.pkl", pkl)
            record(".format_version", b"1")
            record(".storage_alignment", str(_ALIGNMENT).encode())
            record("byteorder", b"little")
            for i, (_, arr, _) in enumerate(arrays):
                record(f"data/{i}", arr)
            record("version", b"3\n")
