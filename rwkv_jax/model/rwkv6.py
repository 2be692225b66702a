"""RWKV-6 "Finch" time-mix and channel-mix (reference §4): data-dependent token shift
("ddlerp", LoRA ``time_maa_w1/w2``) and data-dependent per-token decay (``time_decay_w1/w2``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.layers import (Module, F32, host_rng, mix_vector, token_shift, uniform,
                                   vec)
from rwkv_jax.model.rwkv4 import _ratios
from rwkv_jax.model.rwkv5 import MatrixStateTimeMix, heads, linear
from rwkv_jax.ops.wkv6 import wkv6


def _uniform(rngs, shape, scale, dtype):
    return nnx.Param(uniform(host_rng(rngs), shape, scale, dtype))


class TimeMix6(MatrixStateTimeMix):
    """RWKV-6 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the [key, value] layout."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        D, Dw = cfg.d_mix, cfg.d_decay
        r01, r10, ddd = _ratios(cfg, layer_id)
        n = np.arange(C, dtype=np.float64) / max(C - 1, 1)
        self.time_maa_x = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_w = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_k = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_v = mix_vector(1 - (ddd ** r10 + 0.3 * r01), pd)
        self.time_maa_r = mix_vector(1 - ddd ** (0.5 * r10), pd)
        self.time_maa_g = mix_vector(1 - ddd ** (0.5 * r10), pd)
        self.time_maa_w1 = nnx.Param(jnp.zeros((C, 5 * D), pd))
        self.time_maa_w2 = _uniform(rngs, (5, D, C), 0.01, pd)
        self.time_decay = mix_vector(-6 + 5 * n ** (0.7 + 1.3 * r01), pd)
        self.time_decay_w1 = nnx.Param(jnp.zeros((C, Dw), pd))
        self.time_decay_w2 = _uniform(rngs, (Dw, C), 0.01, pd)
        faaaa = r01 * (1 - n) + 0.1 * (((np.arange(C) + 1) % 3) - 1)
        self.time_faaaa = nnx.Param(jnp.asarray(faaaa.reshape(H, N), F32).astype(pd))
        self._init_projections(cfg, layer_id, rngs)
        self.gate = linear(cfg, rngs, C, C, 0.1)

    def __call__(self, x, x_prev, state, v_first=None):
        B, T, C = x.shape
        H = self.n_head
        x = x.astype(F32)
        dx = token_shift(x, x_prev) - x
        xxx = x + dx * vec(self.time_maa_x)
        w1 = self.time_maa_w1[...].astype(F32)
        m = jnp.tanh(xxx @ w1).reshape(B, T, 5, -1)
        m = jnp.einsum("btfd,fdc->btfc", m, self.time_maa_w2[...].astype(F32))
        mw, mk, mv, mr, mg = (m[:, :, i] for i in range(5))                  # order w,k,v,r,g
        xw = x + dx * (vec(self.time_maa_w) + mw)
        xk = x + dx * (vec(self.time_maa_k) + mk)
        xv = x + dx * (vec(self.time_maa_v) + mv)
        xr = x + dx * (vec(self.time_maa_r) + mr)
        xg = x + dx * (vec(self.time_maa_g) + mg)
        r = heads(self.receptance(xr), H)
        k = heads(self.key(xk), H)
        v = heads(self.value(xv), H)
        g = jax.nn.silu(self.gate(xg).astype(F32))
        w_raw = vec(self.time_decay) + jnp.tanh(xw @ self.time_decay_w1[...].astype(F32)) \
            @ self.time_decay_w2[...].astype(F32)
        w = heads(-jnp.exp(w_raw), H)                                         # log decay
        u = self.time_faaaa[...].astype(F32)
        y, state = wkv6(r, w, k, v, u, state, **dict(self.wkv_kwargs))
        return self.output(self._group_norm(y) * g), x[:, -1], state, v_first


class ChannelMix6(Module):
    """RWKV-6 channel-mix: ``xk = x + dx·maa_k``, ``xr = x + dx·maa_r``, then as RWKV-4."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = _ratios(cfg, layer_id)
        self.time_maa_k = mix_vector(1 - ddd ** (r10 ** 3), pd)
        self.time_maa_r = mix_vector(1 - ddd ** (r10 ** 3), pd)
        self.key = linear(cfg, rngs, C, F, 1.0)
        self.receptance = linear(cfg, rngs, C, C, 0.0)
        self.value = linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev):
        x = x.astype(F32)
        dx = token_shift(x, x_prev) - x
        k = jnp.square(jax.nn.relu(self.key(x + dx * vec(self.time_maa_k))))
        r = jax.nn.sigmoid(self.receptance(x + dx * vec(self.time_maa_r)).astype(F32))
        return r * self.value(k).astype(F32), x[:, -1]
