"""The one ``.jsonl`` reader: one JSON value per line, one error policy.

:func:`read_jsonl` yields ``(lineno, value)`` for every non-blank line and raises
:class:`~rwkv_jax.data.files.DataError` naming ``path:line`` for the first line that is not
UTF-8 or not JSON. A malformed *last* line without a trailing newline is what an interrupted
writer leaves behind (a torn append, e.g. ``metrics.jsonl`` after a crash); it raises
:class:`TornLineError`, a ``DataError`` subclass, so a caller can drop it and carry on, or
pass ``drop_torn_last=True`` to have it dropped with a warning.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

from rwkv_jax.data.files import DataError, PathLike

__all__ = ["read_jsonl", "TornLineError"]


class TornLineError(DataError):
    """The last line of a ``.jsonl`` file is incomplete (no trailing newline, not valid JSON).

    Attributes:
      path: the file.
      lineno: the torn line's number (1-based).
    """

    def __init__(self, message: str, path: pathlib.Path, lineno: int):
        super().__init__(message)
        self.path, self.lineno = path, lineno


def read_jsonl(path: PathLike, *, drop_torn_last: bool = False) -> Iterator[tuple[int, Any]]:
    """``(lineno, value)`` for each non-blank line of ``path``, in order (lineno is 1-based).

    Lines are split at ``\\n`` only (JSON strings cannot hold a raw newline) and decoded as
    UTF-8 one by one, so every error names its line; a UTF-8 byte-order mark on the first line
    is ignored. Blank (whitespace-only) lines are skipped.

    Raises:
      DataError: ``path: no such file``, or ``path:line: not UTF-8 / not valid JSON``.
      TornLineError: the last line has no trailing newline and is not valid JSON (unless
        ``drop_torn_last``, which drops it with a :class:`UserWarning` instead).
    """
    p = pathlib.Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            torn = not raw.endswith(b"\n")  # only the last line can lack one
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if torn:  # a torn write may cut a multi-byte character too
                    _torn(p, lineno, f"not UTF-8 ({e.reason})", drop_torn_last)
                    return
                raise DataError(f"{p}:{lineno}: not UTF-8 ({e.reason})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if torn:
                    _torn(p, lineno, f"not valid JSON ({e.msg})", drop_torn_last)
                    return
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            yield lineno, value


def _torn(p: pathlib.Path, lineno: int, why: str, drop: bool) -> None:
    msg = f"{p}:{lineno}: incomplete last line (no trailing newline; {why})"
    if not drop:
        raise TornLineError(msg, p, lineno)
    warnings.warn(f"{msg}; dropped", stacklevel=3)
