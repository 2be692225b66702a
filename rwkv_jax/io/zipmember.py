"""Bounded access to the members of a zip archive (``.pth`` checkpoints, ``.npz`` states).

A zip member's sizes are claims: ``file_size`` in the central directory may be small while
its deflate stream inflates to gigabytes (a zip bomb), or huge while the data is a few bytes.
The rules here keep memory proportional to what the caller asked for:

- :func:`inflate_problem` refuses compressed members whose claimed size is far beyond what
  real tensors compress to, before anything is inflated;
- :func:`read_prefix` inflates exactly the bytes asked for, in chunks, into one buffer
  (never the rest of the member, never a second copy);
- :func:`crc_problems` streams every member once to check its CRC-32, in bounded memory.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

import numpy as np

__all__ = ["CHUNK", "crc_problems", "data_offset", "inflate_problem", "read_prefix"]

CHUNK = 16 << 20  # bytes read or inflated per step
# Float weights deflate to ~90% of their size, zero-heavy integer tensors to a few percent;
# deflate's ceiling is ~1030:1, which only runs of one byte reach. Small members may be
# anything (a zero bias compresses ~1000:1); past the free size the ratio is what counts.
MAX_INFLATE_RATIO = 100
INFLATE_FREE_BYTES = 64 << 20

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped fields), name len, extra len
_LOCAL_HEADER_SIG = b"PK\x03\x04"


def inflate_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a compressed member must not be inflated (probable zip bomb), or None."""
    if info.compress_type == zipfile.ZIP_STORED:
        return None
    if info.file_size > max(INFLATE_FREE_BYTES, MAX_INFLATE_RATIO * info.compress_size):
        return (f"member '{info.filename}' claims to inflate {info.compress_size} compressed "
                f"bytes to {info.file_size} (over {MAX_INFLATE_RATIO}:1): refused as a probable "
                "zip bomb (torch and numpy write members uncompressed)")
    return None


def data_offset(fh, info: zipfile.ZipInfo) -> int:
    """Absolute file offset of a member's data, from its *local* header.

    The central directory's extra field can differ from the local one (torch pads only
    the local header), so the local header is read: 30 + len(name) + len(extra).
    """
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) < _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"local header of {info.filename} is cut off")
    sig, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if sig != _LOCAL_HEADER_SIG:
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def read_prefix(src, nbytes: int, what: str) -> np.ndarray:
    """Exactly the next ``nbytes`` of the open member stream ``src`` as a writable uint8 array.

    Inflates no more than ``nbytes`` (plus zipfile's small read-ahead). zipfile checks the
    CRC when the read reaches the end of the member. Raises ``EOFError`` naming ``what`` when
    the member holds fewer bytes.
    """
    buf = np.empty(nbytes, np.uint8)
    view, done = memoryview(buf), 0
    while done < nbytes:
        chunk = src.read(min(CHUNK, nbytes - done))
        if not chunk:
            raise EOFError(f"{what} is truncated: {done} of {nbytes} bytes")
        view[done : done + len(chunk)] = chunk
        done += len(chunk)
    return buf


def crc_problems(zf: zipfile.ZipFile) -> list[str]:
    """Every member whose data does not match its CRC-32 (or cannot be read), one line each.

    Streams each member once in :data:`CHUNK` pieces; bomb-like members (see
    :func:`inflate_problem`) are reported instead of inflated.
    """
    problems = []
    for info in zf.infolist():
        if problem := inflate_problem(info):
            problems.append(problem)
            continue
        try:
            with zf.open(info) as src:
                while src.read(CHUNK):
                    pass
        except zipfile.BadZipFile as e:  # "Bad CRC-32 for file ...", bad local header
            problems.append(f"member '{info.filename}': {e}")
        except (EOFError, OSError, zlib.error, ValueError, NotImplementedError,
                RuntimeError) as e:
            problems.append(f"member '{info.filename}' is unreadable "
                            f"({type(e).__name__}: {e})")
    return problems
