"""RWKV-7 "Goose" time-mix and channel-mix (reference §5): generalised delta rule with
vector-valued decay and in-context learning rate, value residual from layer 0, ``r_k`` bonus."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.layers import (Module, F32, host_rng, mix_vector, orthogonal,
                                   token_shift, vec)
from rwkv_jax.model.rwkv4 import _ratios
from rwkv_jax.model.rwkv5 import MatrixStateTimeMix, heads, linear
from rwkv_jax.ops.wkv7 import wkv7

# log decay = -exp(-0.5)·sigmoid(w_lin): per-step decay in (e^{-e^{-0.5}} ≈ 0.545, 1)
_DECAY_SCALE = math.exp(-0.5)


def _lora_pair(cfg, rngs, name_rank: int, scale_out: float):
    """(x1 [C, D] zeros, x2 [D, C] orthogonal(0.1·...)) as train_temp initialises them."""
    C, pd = cfg.n_embd, cfg.param_jnp_dtype
    gain = scale_out * (math.sqrt(name_rank / C) if name_rank > C else 1.0)
    x1 = nnx.Param(jnp.zeros((C, name_rank), pd))
    x2 = nnx.Param(orthogonal(host_rng(rngs), (name_rank, C), gain, pd))
    return x1, x2


class TimeMix7(MatrixStateTimeMix):
    """RWKV-7 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the official [value, key] layout.
    Layer 0 produces ``v_first`` (its values); later layers mix towards it."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        r01, r10, ddd = _ratios(cfg, layer_id)
        c = np.arange(C, dtype=np.float64)
        linear_c = c / max(C - 1, 1) - 0.5
        z = ((c % N) - (N - 1) / 2) / max((N - 1) / 2, 1)
        zig = z * np.abs(z)
        www = -6 + 6 * (c / max(C - 1, 1)) ** (1 + r01 ** 0.3)
        self.x_r = mix_vector(1 - ddd ** (0.2 * r10), pd)
        self.x_w = mix_vector(1 - ddd ** (0.9 * r10), pd)
        self.x_k = mix_vector(1 - ddd ** (0.7 * r10), pd)
        self.x_v = mix_vector(1 - ddd ** (0.7 * r10), pd)
        self.x_a = mix_vector(1 - ddd ** (0.9 * r10), pd)
        self.x_g = mix_vector(1 - ddd ** (0.2 * r10), pd)
        self.w0 = mix_vector(www + 0.5 + 2.5 * zig, pd)
        self.w1, self.w2 = _lora_pair(cfg, rngs, cfg.d_decay, 0.1)
        self.a0 = mix_vector(-0.19 + 0.3 * zig + 0.4 * linear_c, pd)
        self.a1, self.a2 = _lora_pair(cfg, rngs, cfg.d_aaa, 0.1)
        self.first = layer_id == 0
        if not self.first:  # value residual: layer 0 has none (its v is v_first)
            self.v0 = mix_vector(0.73 - 0.4 * linear_c, pd)
            self.v1, self.v2 = _lora_pair(cfg, rngs, cfg.d_mv, 0.1)
        self.g1, self.g2 = _lora_pair(cfg, rngs, cfg.d_gate, 0.1)
        self.k_k = mix_vector(0.71 - 0.1 * linear_c, pd)
        self.k_a = mix_vector(np.full(C, 1.02), pd)
        self.r_k = nnx.Param(jnp.full((H, N), -0.04, F32).astype(pd))
        self._init_projections(cfg, layer_id, rngs)

    def __call__(self, x, x_prev, state, v_first=None):
        B, T, C = x.shape
        H = self.n_head
        x = x.astype(F32)
        dx = token_shift(x, x_prev) - x
        xr, xw, xk, xv, xa, xg = (x + dx * vec(p) for p in
                                  (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        p = lambda t: t[...].astype(F32)  # noqa: E731
        r = self.receptance(xr).astype(F32)
        k = self.key(xk).astype(F32)
        v = self.value(xv).astype(F32)
        w_lin = vec(self.w0) + jnp.tanh(xw @ p(self.w1)) @ p(self.w2)
        w = -_DECAY_SCALE * jax.nn.sigmoid(w_lin)                               # log decay
        a = jax.nn.sigmoid(vec(self.a0) + (xa @ p(self.a1)) @ p(self.a2))
        g = jax.nn.sigmoid(xg @ p(self.g1)) @ p(self.g2)
        kk = heads(k * vec(self.k_k), H)
        kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
        k = k * (1 + (a - 1) * vec(self.k_a))
        if self.first:
            v_first = v
        else:
            v = v + (v_first - v) * jax.nn.sigmoid(vec(self.v0) + (xv @ p(self.v1)) @ p(self.v2))
        r_h, k_h, v_h, a_h = heads(r, H), heads(k, H), heads(v, H), heads(a, H)
        y, state = wkv7(r_h, heads(w, H), k_h, v_h, -kk, kk * a_h, state,
                        **dict(self.wkv_kwargs))
        y = self._group_norm(y)
        bonus = jnp.sum(r_h * k_h * p(self.r_k)[None, None], axis=-1, keepdims=True) * v_h
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], state, v_first


class ChannelMix7(Module):
    """RWKV-7 channel-mix: ``relu(Wk(x + dx·x_k))² @ Wv.T``; F = 4C, no receptance gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = _ratios(cfg, layer_id)
        self.x_k = mix_vector(1 - ddd ** (r10 ** 4), pd)
        self.key = linear(cfg, rngs, C, F, 1.0)
        self.value = linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev):
        x = x.astype(F32)
        dx = token_shift(x, x_prev) - x
        k = jnp.square(jax.nn.relu(self.key(x + dx * vec(self.x_k))))
        return self.value(k).astype(F32), x[:, -1]
