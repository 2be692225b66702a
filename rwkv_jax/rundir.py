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
import os
import pathlib
from typing import Any

from rwkv_jax.io.pth import CheckpointError

PathLike = str | os.PathLike

# RWKVConfig fields a checkpoint's shapes cannot tell, read back from config.json
_UNSHAPED = ("ln_eps", "ln_x_eps", "chunk_size")


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

    def model_file(self) -> pathlib.Path:
        """The model checkpoint in this directory; CheckpointError when there is none."""
        for name in (self.MODEL, self.MODEL_PTH):
            if (self.path / name).is_file():
                return self.path / name
        raise CheckpointError(f"{self.path}: directory holds no {self.MODEL} or {self.MODEL_PTH}")

    # ---- the model config ------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        """config.json as a dict (None when absent); CheckpointError naming it when it is
        not a readable JSON object."""
        p = self.path / self.CONFIG
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable model config ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
        return d

    def config_overrides(self) -> dict[str, Any]:
        """The saved config fields shapes cannot tell (epsilons, chunk size), only those the
        saved version has (older files listed every field of every version)."""
        saved = self.read_config()
        if not saved:
            return {}
        from rwkv_jax import versions
        version = saved.get("version")
        own = versions.REGISTRY[version].extras if version in versions.REGISTRY else {}
        extra_names = versions.all_extras()
        return {k: saved[k] for k in _UNSHAPED
                if saved.get(k) is not None and (k not in extra_names or k in own)}

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


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
