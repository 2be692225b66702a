"""RWKV-5 "Eagle" time-mix (reference §3): matrix-valued WKV state per head.

Two layouts, told apart by the checkpoint keys (the official ``rwkv`` package's rules):

* ``5.2`` (x052, the released Eagle models): ``time_decay``/``time_faaaa`` [H, N] per head
  and key channel, bonus ``u = time_faaaa`` used linearly, gate ``g = silu(Wg x_g)``.
* ``5.1`` (pre-release, as the tiny fixture): per-head ``time_decay`` [H] and
  ``time_first`` [H] with ``u = exp(time_first)``, no gate.

Channel-mix is RWKV-4's (:class:`~rwkv_jax.model.rwkv4.ChannelMix4`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.layers import (Module, F32, LayerNorm, Linear, group_norm, host_rng, mix_vector,
                                   orthogonal, token_shift, vec)
from rwkv_jax.model.rwkv4 import _ratios
from rwkv_jax.ops.wkv6 import wkv6


def linear(cfg: RWKVConfig, rngs: nnx.Rngs, d_in: int, d_out: int, gain: float) -> Linear:
    """A Linear with orthogonal(gain) init, no sqrt(out/in) factor (RWKV-5+ convention)."""
    w = orthogonal(host_rng(rngs), (d_out, d_in), gain, cfg.param_jnp_dtype)
    return Linear(d_in, d_out, init=w, compute_dtype=cfg.compute_jnp_dtype)


def ln_x(cfg: RWKVConfig, layer_id: int) -> LayerNorm:
    """The per-head GroupNorm's affine parameters, weight ``((1+i)/L)^0.7`` (official init)."""
    norm = LayerNorm(cfg.n_embd, cfg.ln_x_eps, cfg.param_jnp_dtype)
    w = ((1 + layer_id) / cfg.n_layer) ** 0.7
    norm.weight = nnx.Param(jnp.full((cfg.n_embd,), w, F32).astype(cfg.param_jnp_dtype))
    return norm


def wkv_kwargs(cfg: RWKVConfig) -> tuple[tuple[str, object], ...]:
    """Keyword arguments of the WKV op, as a hashable tuple (modules' static attributes
    must hash: compiled functions are cached on the graph definition)."""
    kw = {"impl": cfg.wkv_impl}
    if cfg.chunk_size is not None:
        kw["chunk_size"] = cfg.chunk_size
    return tuple(kw.items())


def heads(x: jax.Array, n_head: int) -> jax.Array:
    """[B, T, C] -> [B, T, H, N]."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head)


class MatrixStateTimeMix(Module):
    """What RWKV-5, 6 and 7 time-mix share: r/k/v/output projections with the official
    init, the per-head GroupNorm ``ln_x`` and a float32 [B, H, N, N] WKV state."""

    def _init_projections(self, cfg: RWKVConfig, layer_id: int, rngs: nnx.Rngs) -> None:
        C = cfg.n_embd
        self.receptance = linear(cfg, rngs, C, C, 1.0)
        self.key = linear(cfg, rngs, C, C, 0.1)
        self.value = linear(cfg, rngs, C, C, 1.0)
        self.output = linear(cfg, rngs, C, C, 0.0)
        self.ln_x = ln_x(cfg, layer_id)
        self.n_head = cfg.n_head
        self.wkv_kwargs = wkv_kwargs(cfg)

    def _group_norm(self, y: jax.Array) -> jax.Array:
        """WKV output [B, T, H, N] -> ``ln_x`` GroupNorm over each head, [B, T, C] float32."""
        B, T, H, N = y.shape
        return group_norm(y.reshape(B, T, H * N), self.ln_x.weight[...], self.ln_x.bias[...],
                          H, self.ln_x.eps)

    @staticmethod
    def init_state(cfg: RWKVConfig, batch_size: int) -> jax.Array:
        N = cfg.head_size
        return jnp.zeros((batch_size, cfg.n_head, N, N), F32)


class TimeMix5(MatrixStateTimeMix):
    """RWKV-5 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the [key, value] layout."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        r01, r10, ddd = _ratios(cfg, layer_id)
        n = np.arange(C, dtype=np.float64) / max(C - 1, 1)
        decay = -6 + 5 * n ** (0.7 + 1.3 * r01)
        faaaa = r01 * (1 - n) + 0.1 * (((np.arange(C) + 1) % 3) - 1)
        self.gated = cfg.version == "5.2"
        self.time_mix_k = mix_vector(ddd ** r10, pd)
        self.time_mix_v = mix_vector(ddd ** r10 + 0.3 * r01, pd)
        self.time_mix_r = mix_vector(ddd ** (0.5 * r10), pd)
        if self.gated:
            self.time_mix_g = mix_vector(ddd ** (0.5 * r10), pd)
            self.time_decay = nnx.Param(jnp.asarray(decay.reshape(H, N), F32).astype(pd))
            self.time_faaaa = nnx.Param(jnp.asarray(faaaa.reshape(H, N), F32).astype(pd))
            self.gate = linear(cfg, rngs, C, C, 0.1)
        else:  # 5.1: per-head decay and log-space bonus (pre-release; init by analogy)
            self.time_decay = nnx.Param(jnp.asarray(decay.reshape(H, N).mean(1), F32).astype(pd))
            self.time_first = nnx.Param(jnp.full((H,), math.log(0.3), F32).astype(pd))
        self._init_projections(cfg, layer_id, rngs)

    def __call__(self, x, x_prev, state, v_first=None):
        B, T, C = x.shape
        H = self.n_head
        xx = token_shift(x, x_prev)

        def mix(m):
            m = vec(m)
            return x * m + xx * (1 - m)

        r = heads(self.receptance(mix(self.time_mix_r)), H)
        k = heads(self.key(mix(self.time_mix_k)), H)
        v = heads(self.value(mix(self.time_mix_v)), H)
        if self.gated:
            w = -jnp.exp(self.time_decay[...].astype(F32))                      # [H, N]
            u = self.time_faaaa[...].astype(F32)
        else:
            N = C // H
            w = jnp.broadcast_to(-jnp.exp(self.time_decay[...].astype(F32))[:, None], (H, N))
            u = jnp.broadcast_to(jnp.exp(self.time_first[...].astype(F32))[:, None], (H, N))
        y, state = wkv6(r, w, k, v, u, state, **dict(self.wkv_kwargs))
        y = self._group_norm(y)
        if self.gated:
            y = y * jax.nn.silu(self.gate(mix(self.time_mix_g)).astype(F32))
        return self.output(y), x[:, -1].astype(F32), state, v_first
