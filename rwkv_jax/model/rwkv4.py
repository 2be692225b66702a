"""RWKV-4 time-mix and channel-mix (reference §2), official names, init and numerics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.layers import (Module, F32, Linear, host_rng, mix_vector, orthogonal,
                                   token_shift, vec)
from rwkv_jax.ops.wkv4 import Wkv4State, wkv4


def _ratios(cfg: RWKVConfig, layer_id: int):
    """(r01, r10, ddd) of the official init: layer position and channel ramp c/C."""
    L, C = cfg.n_layer, cfg.n_embd
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - layer_id / L
    ddd = np.arange(C, dtype=np.float64) / C
    return r01, r10, ddd


def _linear(cfg, rngs, d_in, d_out, gain):
    """A Linear with the official orthogonal(gain) init (gain 0 = zeros)."""
    w = orthogonal(host_rng(rngs), (d_out, d_in), gain, cfg.param_jnp_dtype)
    return Linear(d_in, d_out, init=w, compute_dtype=cfg.compute_jnp_dtype)


def _gain(d_out, d_in):
    """v4neo: ``sqrt(out/in)`` when the matrix expands, else 1."""
    return math.sqrt(d_out / d_in) if d_out > d_in else 1.0


class TimeMix4(Module):
    """RWKV-4 attention replacement: token-shift mix, r/k/v projections, WKV, output.

    Call: ``(x [B,T,C] LN output, x_prev [B,C], wkv_state, v_first)`` ->
    ``(out [B,T,C] compute dtype, new x_prev [B,C] f32, new wkv_state, v_first)``.
    """

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, pd = cfg.n_embd, cfg.param_jnp_dtype
        r01, r10, ddd = _ratios(cfg, layer_id)
        h = np.arange(C, dtype=np.float64)
        decay = -5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
        zigzag = ((h + 1) % 3) - 1
        self.time_decay = nnx.Param(jnp.asarray(decay, F32).astype(pd))
        self.time_first = nnx.Param(jnp.asarray(math.log(0.3) + 0.5 * zigzag, F32).astype(pd))
        self.time_mix_k = mix_vector(ddd ** r10, pd)
        self.time_mix_v = mix_vector(ddd ** r10 + 0.3 * r01, pd)
        self.time_mix_r = mix_vector(ddd ** (0.5 * r10), pd)
        self.key = _linear(cfg, rngs, C, C, 0.0)
        self.value = _linear(cfg, rngs, C, C, _gain(C, C))
        self.receptance = _linear(cfg, rngs, C, C, 0.0)
        self.output = _linear(cfg, rngs, C, C, 0.0)
        self.impl = cfg.wkv_impl

    def __call__(self, x, x_prev, state: Wkv4State, v_first=None):
        xx = token_shift(x, x_prev)
        mk, mv, mr = vec(self.time_mix_k), vec(self.time_mix_v), vec(self.time_mix_r)
        k = self.key(x * mk + xx * (1 - mk))
        v = self.value(x * mv + xx * (1 - mv))
        r = jax.nn.sigmoid(self.receptance(x * mr + xx * (1 - mr)).astype(F32))
        w = -jnp.exp(self.time_decay[...].astype(F32))
        y, state = wkv4(w, self.time_first[...].astype(F32), k, v, state, impl=self.impl)
        return self.output(r * y.astype(F32)), x[:, -1].astype(F32), state, v_first

    @staticmethod
    def init_state(cfg: RWKVConfig, batch_size: int) -> Wkv4State:
        return Wkv4State.zeros(batch_size, cfg.n_embd)


class ChannelMix4(Module):
    """RWKV-4/5 feed-forward: ``sigmoid(r) ⊙ (relu(k)² @ Wv.T)`` with token-shift mixing.

    Call: ``(x [B,T,C], x_prev [B,C])`` -> ``(out [B,T,C], new x_prev [B,C] f32)``.
    """

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = _ratios(cfg, layer_id)
        self.time_mix_k = mix_vector(ddd ** r10, pd)
        self.time_mix_r = mix_vector(ddd ** r10, pd)
        # v4neo scales by sqrt(out/in); RWKV-5 uses gain 1
        self.key = _linear(cfg, rngs, C, F, _gain(F, C) if cfg.version == "4" else 1.0)
        self.receptance = _linear(cfg, rngs, C, C, 0.0)
        self.value = _linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev):
        xx = token_shift(x, x_prev)
        mk, mr = vec(self.time_mix_k), vec(self.time_mix_r)
        k = jnp.square(jax.nn.relu(self.key(x * mk + xx * (1 - mk))))
        r = jax.nn.sigmoid(self.receptance(x * mr + xx * (1 - mr)).astype(F32))
        return r * self.value(k).astype(F32), x[:, -1].astype(F32)
