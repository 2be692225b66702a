"""rwkv-jax: RWKV language models (v4, v5 Eagle, v6 Finch, v7 Goose) in JAX / Flax NNX.

Quick start::

    import rwkv_jax
    model = rwkv_jax.load("rwkv4-tiny-660k.pth")        # official .pth, no torch needed
    logits, state = model(tokens)                        # tokens [B, T] int32
    logits, state = model(more_tokens, state)            # continue from the state

The public names are imported on first use (PEP 562), so ``import rwkv_jax`` and
``import rwkv_jax.cli`` do not import JAX; ``rwkv_jax.load`` etc. import it when touched.
Importing the package never changes JAX's global configuration.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "RWKV": "rwkv_jax.model.lm",
    "LayerState": "rwkv_jax.model.lm",
    "RWKVConfig": "rwkv_jax.config",
    "ConfigError": "rwkv_jax.config",
    "WkvImpl": "rwkv_jax.ops.impl",
    "load": "rwkv_jax.checkpoint",
    "load_tokenizer": "rwkv_jax.checkpoint",
    "verify": "rwkv_jax.checkpoint",
    "RunDir": "rwkv_jax.rundir",
    "save": "rwkv_jax.checkpoint",
    "CheckpointError": "rwkv_jax.checkpoint",
    "Sampling": "rwkv_jax.generate",
    "generate": "rwkv_jax.generate",
    "stream": "rwkv_jax.generate",
    "load_state": "rwkv_jax.state",
    "save_state": "rwkv_jax.state",
}

__all__ = ["RWKV", "RWKVConfig", "LayerState", "WkvImpl", "load", "load_tokenizer", "verify",
           "RunDir", "save", "CheckpointError",
           "ConfigError", "Sampling", "generate", "stream", "load_state", "save_state",
           "__version__"]

if TYPE_CHECKING:  # static tools see the eager imports
    from rwkv_jax.checkpoint import CheckpointError, load, load_tokenizer, save, verify
    from rwkv_jax.rundir import RunDir
    from rwkv_jax.config import ConfigError, RWKVConfig
    from rwkv_jax.generate import Sampling, generate, stream
    from rwkv_jax.model.lm import RWKV, LayerState
    from rwkv_jax.ops.impl import WkvImpl
    from rwkv_jax.state import load_state, save_state


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``rwkv_jax.data``), on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its imports is missing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``rwkv_jax.generate`` the function: importing the submodule
    ``rwkv_jax.generate`` would otherwise rebind the package attribute to the module (the
    eager ``from rwkv_jax.generate import generate`` used to win by running last)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
