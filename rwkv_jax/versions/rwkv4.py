"""RWKV-4 (reference §2): time-mix and channel-mix with official names, init and numerics,
and everything else specific to the version (:data:`SPEC`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import names
from rwkv_jax.model.layers import (F32, Module, init_ratios, linear, mix_vector, token_shift,
                                   vec)
from rwkv_jax.ops.wkv4 import SUPPORTED, Wkv4State, wkv4
from rwkv_jax.versions.base import COMMON_PARAM_AXES, VEC, VersionSpec


def expand_gain(d_out: int, d_in: int) -> float:
    """v4neo's orthogonal gain: ``sqrt(out/in)`` when the matrix expands, else 1."""
    return math.sqrt(d_out / d_in) if d_out > d_in else 1.0


class TimeMix4(Module):
    """RWKV-4 attention replacement: token-shift mix, r/k/v projections, WKV, output.

    Call: ``(x [B,T,C] LN output, x_prev [B,C], wkv_state, v_first, resets)`` ->
    ``(out [B,T,C] compute dtype, new x_prev [B,C] f32, new wkv_state, v_first)``;
    ``resets`` (bool [B,T] or None): document starts, which see the empty state.
    """

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, pd = cfg.n_embd, cfg.param_jnp_dtype
        r01, r10, ddd = init_ratios(cfg, layer_id)
        h = np.arange(C, dtype=np.float64)
        decay = -5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
        zigzag = ((h + 1) % 3) - 1
        self.time_decay = nnx.Param(jnp.asarray(decay, F32).astype(pd))
        self.time_first = nnx.Param(jnp.asarray(math.log(0.3) + 0.5 * zigzag, F32).astype(pd))
        self.time_mix_k = mix_vector(ddd ** r10, pd)
        self.time_mix_v = mix_vector(ddd ** r10 + 0.3 * r01, pd)
        self.time_mix_r = mix_vector(ddd ** (0.5 * r10), pd)
        self.key = linear(cfg, rngs, C, C, 0.0)
        self.value = linear(cfg, rngs, C, C, expand_gain(C, C))
        self.receptance = linear(cfg, rngs, C, C, 0.0)
        self.output = linear(cfg, rngs, C, C, 0.0)
        self.impl = cfg.wkv_impl

    def __call__(self, x, x_prev, state: Wkv4State, v_first=None, resets=None):
        xx = token_shift(x, x_prev, resets)
        mk, mv, mr = vec(self.time_mix_k), vec(self.time_mix_v), vec(self.time_mix_r)
        k = self.key(x * mk + xx * (1 - mk))
        v = self.value(x * mv + xx * (1 - mv))
        r = jax.nn.sigmoid(self.receptance(x * mr + xx * (1 - mr)).astype(F32))
        w = -jnp.exp(self.time_decay[...].astype(F32))
        y, state = wkv4(w, self.time_first[...].astype(F32), k, v, state, impl=self.impl,
                        resets=resets)
        return self.output(r * y.astype(F32)), x[:, -1].astype(F32), state, v_first

    @staticmethod
    def init_state(cfg: RWKVConfig, batch_size: int) -> Wkv4State:
        return Wkv4State.zeros(batch_size, cfg.n_embd)


class ChannelMix4(Module):
    """RWKV-4/5 feed-forward: ``sigmoid(r) ⊙ (relu(k)² @ Wv.T)`` with token-shift mixing.

    Call: ``(x [B,T,C], x_prev [B,C], resets)`` -> ``(out [B,T,C], new x_prev [B,C] f32)``.
    ``expand_key``: init the key matrix with v4neo's ``sqrt(F/C)`` gain (RWKV-5 uses 1).
    """

    expand_key = True

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = init_ratios(cfg, layer_id)
        self.time_mix_k = mix_vector(ddd ** r10, pd)
        self.time_mix_r = mix_vector(ddd ** r10, pd)
        self.key = linear(cfg, rngs, C, F, expand_gain(F, C) if self.expand_key else 1.0)
        self.receptance = linear(cfg, rngs, C, C, 0.0)
        self.value = linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev, resets=None):
        xx = token_shift(x, x_prev, resets)
        mk, mr = vec(self.time_mix_k), vec(self.time_mix_r)
        k = jnp.square(jax.nn.relu(self.key(x * mk + xx * (1 - mk))))
        r = jax.nn.sigmoid(self.receptance(x * mr + xx * (1 - mr)).astype(F32))
        return r * self.value(k).astype(F32), x[:, -1].astype(F32)


SPEC = VersionSpec(
    version="4",
    title="RWKV-4",
    time_mix=TimeMix4,
    channel_mix=ChannelMix4,
    wkv_op="wkv4",
    wkv_forms=SUPPORTED,
    extras={},
    ffn_size=lambda C: 4 * C,
    detect=lambda shapes: True,  # asked last: what is not a later version is RWKV-4
    infer=lambda shapes: {},
    lr_multipliers={"time_first": 3.0, "time_decay": 2.0},
    names={"hf": names.HF_PREFIXED},
    lora_targets=(r"blocks\.\d+\.att\.(receptance|key|value|output)\.weight",
                  r"blocks\.\d+\.ffn\.(key|value|receptance)\.weight"),
    param_axes=COMMON_PARAM_AXES + (
        (r"blocks\.\d+\.att\.time_(decay|first)", ("channel",)),
        (r"blocks\.\d+\.(att|ffn)\.time_mix_[kvr]", VEC),
    ),
)
