"""Find NaN/inf in loaded arrays, cheaply: one vectorised pass per array, in bounded chunks.

float32/float64 use numpy's SIMD ``isfinite``. float16 and bfloat16 are tested on their raw
bits instead (a float is NaN or inf exactly when all its exponent bits are set: one AND and
one compare per element), which is faster than numpy's float16 ``isfinite`` and needs no
bfloat16 ufunc. Chunks keep temporaries small; other dtypes are always finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

__all__ = ["nonfinite_counts", "nonfinite_summary"]

# dtype -> (same-width unsigned view, exponent mask)
_EXPONENT_BITS: dict[np.dtype, tuple[type, int]] = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7F80_0000),
    np.dtype(np.float64): (np.uint64, 0x7FF0_0000_0000_0000),
}
_CHUNK = 1 << 22  # elements per step


def _count(arr: np.ndarray) -> int:
    spec = _EXPONENT_BITS.get(arr.dtype.newbyteorder("="))
    if spec is None or arr.size == 0:
        return 0
    uint, mask = spec
    bits = np.ascontiguousarray(arr).reshape(-1).view(arr.dtype.newbyteorder("=")).view(uint)
    if not arr.dtype.isnative:
        bits = bits.byteswap()
    mask = uint(mask)
    count = 0
    for i in range(0, bits.size, _CHUNK):
        chunk = bits[i : i + _CHUNK]
        if uint in (np.uint32, np.uint64):
            finite = np.isfinite(chunk.view(arr.dtype.newbyteorder("=")))
            if not finite.all():
                count += int(finite.size - np.count_nonzero(finite))
        else:
            count += int(np.count_nonzero((chunk & mask) == mask))
    return count


def nonfinite_counts(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """``(name, NaN/inf count, size)`` for every array holding any, in ``arrays`` order."""
    out = []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if n := _count(arr):
            out.append((name, n, arr.size))
    return out


def nonfinite_summary(arrays: Mapping[str, np.ndarray], what: str = "tensor",
                      limit: int = 5) -> str | None:
    """One line naming the first ``limit`` arrays that hold NaN/inf, or None if all finite."""
    bad = nonfinite_counts(arrays)
    if not bad:
        return None
    shown = ", ".join(f"'{name}' ({n} of {size})" for name, n, size in bad[:limit])
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    verb = f"{what}s hold" if len(bad) > 1 else f"{what} holds"
    return f"{len(bad)} {verb} NaN/inf values: {shown}{more}"
