"""The one owner of a run directory's layout, for reading and writing.

A run directory is what training writes and what :func:`rwkv_jax.load`, ``rwkv-jax
generate`` and ``convert`` read::

    run/
      model.safetensors   the model (official names; merged adapters after LoRA)
      config.json         its RWKVConfig (the fields shapes cannot tell are read back)
      tokenizer.json      its tokenizer (an rwkv-jax spec or a Hugging Face file)
      state.npz           a tuned initial state (state tuning), for --state-in / load_state
      lora.safetensors    LoRA adapters alone, with the base checkpoint's name and hash
      config.yaml         the resolved training config
      metrics.jsonl       one JSON object per logged step
      data.json           the fingerprint of the training data (checked on resume)
      checkpoints/        orbax training checkpoints (rwkv_jax.train.checkpoints)
      lock                held by the trainer running in this directory (:meth:`RunDir.lock`)

Everything that knows these names asks :class:`RunDir`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import socket
import time
from typing import Any

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import describe, file_kind, read_small, write_text_atomic

PathLike = str | os.PathLike

# config.json fields read back: those a checkpoint's shapes cannot tell (epsilons, chunk
# size) and head_size -> (kind, may be None); each is type-checked
_KEPT = {"ln_eps": (float, False), "ln_x_eps": (float, False), "head_size": (int, False),
         "chunk_size": (int, True)}
_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes


class RunDirBusy(CheckpointError):
    """Another training run holds this run directory's lock."""


def path_kind(path: pathlib.Path) -> str:
    """"file" or "dir"; CheckpointError naming ``path`` when it is missing, unreadable or a
    FIFO / socket / device (which would block or make no sense as a checkpoint)."""
    try:
        return file_kind(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from None


def _exists(path: pathlib.Path) -> bool:
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # a directory we may not list
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from None


def _read_json_object(p: pathlib.Path) -> dict[str, Any] | None:
    """A small JSON object file (None when absent); CheckpointError naming it otherwise."""
    if not _exists(p):
        return None
    try:
        d = json.loads(read_small(p, _CONFIG_BYTES).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {describe(e)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: must hold a JSON object, got {type(d).__name__}")
    return d


class RunDir:
    """Paths and readers/writers of one run directory (it need not exist yet)."""

    MODEL = "model.safetensors"
    MODEL_PTH = "model.pth"
    CONFIG = "config.json"
    TOKENIZER = "tokenizer.json"
    STATE = "state.npz"
    LORA = "lora.safetensors"
    RUN_CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    DATA = "data.json"
    CHECKPOINTS = "checkpoints"
    LOCK = "lock"

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> pathlib.Path:
        return self.path / name

    # ---- what is there ---------------------------------------------------------------------
    @classmethod
    def holds_model(cls, path: PathLike) -> bool:
        """Whether ``path`` is a directory with an exported model in it."""
        p = pathlib.Path(path)
        return p.is_dir() and any((p / n).is_file() for n in (cls.MODEL, cls.MODEL_PTH))

    def checkpoint_file(self) -> pathlib.Path:
        """The checkpoint file this path names: a run directory's model file, or the path
        itself when it is a file. CheckpointError for anything else."""
        if path_kind(self.path) == "dir":
            return self.model_file()
        return self.path

    def model_file(self) -> pathlib.Path:
        """The model checkpoint in this directory; CheckpointError when there is none."""
        for name in (self.MODEL, self.MODEL_PTH):
            if _exists(self.path / name):
                return self.path / name
        raise CheckpointError(f"{self.path}: directory holds no {self.MODEL} or {self.MODEL_PTH}")

    # ---- the model config ------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        """config.json as a dict (None when absent); CheckpointError naming it when it is
        not a readable JSON object."""
        return _read_json_object(self.path / self.CONFIG)

    def config_overrides(self) -> dict[str, Any]:
        """The saved config fields shapes cannot tell (epsilons, chunk size), type-checked,
        keeping only those the saved version has (older files listed every field of every
        version). CheckpointError naming config.json for a malformed one."""
        saved = self.read_config()
        if not saved:
            return {}
        from rwkv_jax import versions
        p = self.path / self.CONFIG
        kept = {}
        for key, (kind, nullable) in _KEPT.items():
            if key not in saved:
                continue
            v = saved[key]
            if v is None and nullable:
                continue
            ok = (type(v) is int if kind is int
                  else type(v) in (int, float) and math.isfinite(v))
            if not ok or v <= 0:
                raise CheckpointError(f"{p}: '{key}' must be a positive "
                                      f"{'integer' if kind is int else 'number'}, got {v!r:.60}")
            kept[key] = v
        kept.pop("head_size", None)  # checked, but the shapes tell it
        version = saved.get("version")
        if version not in versions.REGISTRY:
            return kept
        own, extra_names = versions.REGISTRY[version].extras, versions.all_extras()
        return {k: v for k, v in kept.items() if k not in extra_names or k in own}

    # ---- tokenizer ---------------------------------------------------------------------------
    def tokenizer(self, vocab_size: int | None = None):
        """This run's tokenizer (its tokenizer.json), else the one ``vocab_size`` implies."""
        from rwkv_jax.tokenizers import resolve_tokenizer
        return resolve_tokenizer(None, model_path=self.path, vocab_size=vocab_size)

    # ---- writing -----------------------------------------------------------------------------
    def write_model(self, model, tokenizer=None, *, names: str = "official") -> list[str]:
        """Export ``model`` (+ its config, + ``tokenizer`` when given): what ``load`` reads.

        Each file is written to a temporary and renamed into place. Returns the file names."""
        from rwkv_jax.checkpoint import save
        self.path.mkdir(parents=True, exist_ok=True)
        save(model, self.path / self.MODEL, names=names)
        write_text_atomic(self.path / self.CONFIG, json.dumps(model.config.to_dict(), indent=1))
        written = [self.MODEL, self.CONFIG]
        if tokenizer is not None:
            write_text_atomic(self.path / self.TOKENIZER, json.dumps(tokenizer.to_dict()))
            written.append(self.TOKENIZER)
        return written

    # ---- the data fingerprint ----------------------------------------------------------------
    def read_data_fingerprint(self) -> dict[str, Any] | None:
        """data.json: the fingerprint (:func:`rwkv_jax.data.fingerprint`) of the data this run
        started on; None when absent, CheckpointError naming the file when malformed."""
        return _read_json_object(self.path / self.DATA)

    def write_data_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        """Record ``fingerprint`` as data.json (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / self.DATA, json.dumps(fingerprint, indent=1))

    # ---- the lock ----------------------------------------------------------------------------
    def lock(self) -> RunLock:
        """Take this directory's lock (the ``lock`` file) for one training run; release it with
        :meth:`RunLock.release` or use it as a context manager.

        Mutual exclusion is an exclusive ``flock`` held on the file for the whole run (the
        kernel drops it when the process dies, however it dies); the file holds the holder's
        process id, host name and start time, for the message. A lock file left by a process
        that is gone is taken over: on the same host a free ``flock`` proves it (where the
        filesystem has no ``flock``, the process id being dead does). A holder recorded on
        another host cannot be checked from here, so it is refused.

        Raises:
          RunDirBusy: another run holds it; the message names the holder.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / self.LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(100):  # only loops when a releasing holder unlinks the file under us
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                got = _flock(fd)
                holder = _read_holder(fd)
                if got is False:
                    raise RunDirBusy(_busy(self.path, holder))
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # unlinked by its releasing holder: take the new one
                    os.close(fd)
                    continue
                if holder is not None and not _stale(holder, flock_held=got is True):
                    raise RunDirBusy(_busy(self.path, holder))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                os.fsync(fd)
                return RunLock(path, fd, holder)
            except BaseException:
                os.close(fd)
                raise
        raise RunDirBusy(f"{self.path}: could not take {path} (it keeps being replaced)")


class RunLock:
    """A held run-directory lock (:meth:`RunDir.lock`). ``previous``: the stale holder's
    record that was taken over, or None."""

    def __init__(self, path: pathlib.Path, fd: int, previous: dict | None):
        self.path, self._fd, self.previous = path, fd, previous

    def release(self) -> None:
        """Remove the lock file and drop the lock (again: nothing)."""
        if self._fd is None:
            return
        try:
            # unlink while still holding the flock; a waiter that opened the old file sees it
            # replaced and retries (RunDir.lock)
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> bool | None:
    """Try an exclusive non-blocking flock: True taken, False held by another, None when the
    platform or filesystem has none."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read_holder(fd: int) -> dict | None:
    """The holder record in the lock file (None: empty; {} when unreadable)."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _stale(holder: dict, *, flock_held: bool) -> bool:
    """Whether the recorded holder is gone: it ran on this host and either we now hold the
    flock it would hold, or (no flock here) its process id is not alive."""
    if holder.get("host") != socket.gethostname():
        return False
    return flock_held or not _pid_alive(holder.get("pid"))


def _busy(path: pathlib.Path, holder: dict | None) -> str:
    who = "another process"
    if holder:
        who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        if isinstance(holder.get("started"), (int, float)):
            who += f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))})"
    return (f"{path}: another training run is using this directory: {who} holds "
            f"{path / RunDir.LOCK}; wait for it to finish or choose another out_dir (if that "
            f"run is gone, delete the lock file)")
