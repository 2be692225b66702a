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
      checkpoints/        orbax training checkpoints
      lock                held by the trainer running in this directory

Everything that knows these names asks :class:`RunDir`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import describe, file_kind, read_small, write_text_atomic

PathLike = str | os.PathLike

# config.json fields read back: those a checkpoint's shapes cannot tell (epsilons, chunk
# size) and head_size -> (kind, may be None); each is type-checked
_KEPT = {"ln_eps": (float, False), "ln_x_eps": (float, False), "head_size": (int, False),
         "chunk_size": (int, True)}
_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes


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
        p = self.path / self.CONFIG
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
