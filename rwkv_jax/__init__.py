"""rwkv-jax: RWKV language models (v4, v5 Eagle, v6 Finch, v7 Goose) in JAX / Flax NNX.

Quick start::

    import rwkv_jax
    model = rwkv_jax.load("rwkv4-tiny-660k.pth")        # official .pth, no torch needed
    logits, state = model(tokens)                        # tokens [B, T] int32
    logits, state = model(more_tokens, state)            # continue from the state
"""

from rwkv_jax.checkpoint import CheckpointError, load, save
from rwkv_jax.config import ConfigError, RWKVConfig
from rwkv_jax.generate import Sampling, generate, stream
from rwkv_jax.model.lm import RWKV, LayerState
from rwkv_jax.ops.impl import WkvImpl
from rwkv_jax.state import load_state, save_state

__version__ = "0.1.0"
__all__ = ["RWKV", "RWKVConfig", "LayerState", "WkvImpl", "load", "save", "CheckpointError",
           "ConfigError", "Sampling", "generate", "stream", "load_state", "save_state",
           "__version__"]
