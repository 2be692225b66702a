"""Files in and out: regular files only, small reads bounded, writes atomic.

``open()`` on a FIFO blocks until a writer appears and on a character device reads forever,
so every reader opens through :func:`open_regular`, which looks at the file type first and
opens with ``O_NONBLOCK`` (then re-checks the opened descriptor, so a swap between the two
steps is caught too). Failures are ``OSError`` subclasses whose ``strerror`` reads well after
the file name; callers wrap them in their own error type.

Every writer of a file that must never be seen half-written (checkpoints, state files, run
directory files, caches) goes through :func:`atomic_path`: write a temporary beside the
target, rename it into place on success, remove it on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat
import uuid
from collections.abc import Iterator

__all__ = ["NotARegularFile", "atomic_path", "describe", "file_kind", "open_regular",
           "read_small", "temp_path", "write_text_atomic"]


class NotARegularFile(OSError):
    """The path is a FIFO, socket, device or directory where a regular file is needed."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def file_kind(path: str | os.PathLike) -> str:
    """``"file"`` or ``"dir"``; anything else raises :class:`NotARegularFile`.

    Raises ``FileNotFoundError`` / ``PermissionError`` (from ``os.stat``) as they come.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    raise NotARegularFile(errno.EINVAL, f"is {_kind(mode)}, not a regular file or directory")


def open_regular(path: str | os.PathLike):
    """Open ``path`` for binary reading; refuse (without blocking) anything but a regular file."""
    mode = os.stat(path).st_mode  # before open(): opening a FIFO or a socket blocks or fails
    if not stat.S_ISREG(mode):
        raise NotARegularFile(errno.EINVAL, f"is {_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between stat and open
            raise NotARegularFile(errno.EINVAL, f"is {_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | os.PathLike, limit: int) -> bytes:
    """The whole of a regular file that must be small (a config): at most ``limit`` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"is larger than {limit} bytes")
    return data


def describe(e: OSError) -> str:
    """The reason part of an OSError, e.g. ``Permission denied``."""
    return e.strerror or str(e)


def temp_path(final: str | os.PathLike) -> pathlib.Path:
    """A unique hidden temporary beside ``final`` (same filesystem, so renaming is atomic)."""
    final = pathlib.Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[pathlib.Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it replaces ``p`` in one
    rename, on any exception it is removed and ``p`` is left as it was."""
    final = pathlib.Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
