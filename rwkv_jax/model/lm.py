"""The RWKV language model: embedding, ``ln0``, blocks, ``ln_out``, head (reference §1).

``RWKV(cfg, rngs=...)`` builds any version registered in :data:`MIXERS`; parameter paths
are the official checkpoint keys. The model is a pure function of its inputs and a state::

    logits, state = model(tokens)            # tokens [B, T] int32 -> logits [B, T, V] f32
    logits, state = model(more, state)       # continue from the returned state

Running a sequence whole, as a prefix then the continued state, or one token at a time
gives the same logits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.layers import F32, LayerNorm, Linear, host_rng, orthogonal, uniform
from rwkv_jax.model.rwkv4 import ChannelMix4, TimeMix4
from rwkv_jax.model.rwkv5 import TimeMix5
from rwkv_jax.model.rwkv6 import ChannelMix6, TimeMix6
from rwkv_jax.model.rwkv7 import ChannelMix7, TimeMix7


class LayerState(NamedTuple):
    """One layer's recurrent state, all float32.

    att_x_prev: [B, C] last ``ln1`` output (time-mix token shift).
    wkv: the version's WKV state (RWKV-4: ``Wkv4State``; v5/v6: [B, H, N, N] indexed
      [key, value]; v7: [B, H, N, N] indexed [value, key], as the official package keeps them).
    ffn_x_prev: [B, C] last ``ln2`` output (channel-mix token shift).
    """

    att_x_prev: jax.Array
    wkv: Any
    ffn_x_prev: jax.Array


RWKVState = tuple[LayerState, ...]

# version -> (time-mix class, channel-mix class)
MIXERS: dict[str, tuple[type, type]] = {
    "4": (TimeMix4, ChannelMix4),
    "5.1": (TimeMix5, ChannelMix4),
    "5.2": (TimeMix5, ChannelMix4),
    "6": (TimeMix6, ChannelMix6),
    "7": (TimeMix7, ChannelMix7),
}


class Embedding(nnx.Module):
    """Token embedding ``weight [V, C]`` (official ``emb.weight``)."""

    def __init__(self, cfg: RWKVConfig, *, rngs: nnx.Rngs):
        # v4neo/v5+/v7: uniform ±1e-4 ("SmallInitEmb"; ln0 follows)
        self.weight = nnx.Param(uniform(host_rng(rngs), (cfg.vocab_size, cfg.n_embd), 1e-4,
                                        cfg.param_jnp_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(F32)


class Block(nnx.Module):
    """Pre-LN residual block: ``x += att(ln1(x)); x += ffn(ln2(x))``; layer 0 owns ``ln0``."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        att_cls, ffn_cls = MIXERS[cfg.version]
        pd = cfg.param_jnp_dtype
        if layer_id == 0:
            self.ln0 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.ln1 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.ln2 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.att = att_cls(cfg, layer_id, rngs=rngs)
        self.ffn = ffn_cls(cfg, layer_id, rngs=rngs)

    def __call__(self, x, state: LayerState, v_first=None):
        """x: [B, T, C] float32 residual stream -> (x, new LayerState, v_first)."""
        att_out, att_prev, wkv, v_first = self.att(self.ln1(x), state.att_x_prev, state.wkv,
                                                   v_first)
        x = x + att_out.astype(F32)
        ffn_out, ffn_prev = self.ffn(self.ln2(x), state.ffn_x_prev)
        x = x + ffn_out.astype(F32)
        return x, LayerState(att_prev, wkv, ffn_prev), v_first


class RWKV(nnx.Module):
    """An RWKV language model of any registered version, configured by :class:`RWKVConfig`.

    Build from scratch with the official initialisation: ``RWKV(cfg, rngs=nnx.Rngs(0))``;
    load an official checkpoint with :func:`rwkv_jax.load`.
    """

    def __init__(self, cfg: RWKVConfig, *, rngs: nnx.Rngs):
        if cfg.version not in MIXERS:
            raise NotImplementedError(f"RWKV-{cfg.version} is not implemented; "
                                      f"available: {', '.join(MIXERS)}")
        self.config = cfg
        pd, V, C = cfg.param_jnp_dtype, cfg.vocab_size, cfg.n_embd
        self.emb = Embedding(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_out = LayerNorm(C, cfg.ln_eps, pd)
        gain = 0.5 * (V / C) ** 0.5 if V > C else 0.5
        self.head = Linear(C, V, init=orthogonal(host_rng(rngs), (V, C), gain, pd),
                           compute_dtype=cfg.compute_jnp_dtype)

    def init_state(self, batch_size: int) -> RWKVState:
        """The empty state for ``batch_size`` sequences (all float32)."""
        cfg = self.config
        att_cls, _ = MIXERS[cfg.version]
        zeros = jnp.zeros((batch_size, cfg.n_embd), F32)
        return tuple(LayerState(zeros, att_cls.init_state(cfg, batch_size), zeros)
                     for _ in range(cfg.n_layer))

    def hidden(self, tokens: jax.Array, state: RWKVState | None = None):
        """Final residual stream after ``ln_out``: ([B, T, C] float32, new state)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if state is None:
            state = self.init_state(tokens.shape[0])
        if len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.blocks)}")
        x = self.emb(tokens)
        x = self.blocks[0].ln0(x)
        new_state, v_first = [], None
        for block, layer_state in zip(self.blocks, state):
            x, layer_state, v_first = block(x, layer_state, v_first)
            new_state.append(layer_state)
        return self.ln_out(x), tuple(new_state)

    def __call__(self, tokens: jax.Array, state: RWKVState | None = None):
        """tokens [B, T] int -> (logits [B, T, V] float32, state after the last token)."""
        h, state = self.hidden(tokens, state)
        return self.head(h).astype(F32), state
