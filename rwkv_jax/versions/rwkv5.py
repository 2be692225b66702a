"""RWKV-5 "Eagle" (reference §3): matrix-valued WKV state per head, in two layouts told
apart by the checkpoint keys (the official ``rwkv`` package's rules), each its own version:

* ``5.2`` (x052, the released Eagle models): ``time_decay``/``time_faaaa`` [H, N] per head
  and key channel, bonus ``u = time_faaaa`` used linearly, gate ``g = silu(Wg x_g)``.
* ``5.1`` (pre-release, as the tiny fixture): per-head ``time_decay`` [H] and
  ``time_first`` [H] with ``u = exp(time_first)``, no gate.

Channel-mix is RWKV-4's with gain-1 key init (:class:`ChannelMix5`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import names
from rwkv_jax.model.layers import (F32, MatrixStateTimeMix, heads, init_ratios, linear,
                                   mix_vector, token_shift, vec)
from rwkv_jax.ops.wkv6 import SUPPORTED, wkv6
from rwkv_jax.versions.base import COMMON_PARAM_AXES, VEC, Extra, VersionSpec, shape_of
from rwkv_jax.versions.rwkv4 import ChannelMix4


class TimeMix5(MatrixStateTimeMix):
    """RWKV-5 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first, resets)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the [key, value] layout.
    ``gated``: the 5.2 layout (per-channel decay and bonus, gate) or 5.1's."""

    gated = True

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        r01, r10, ddd = init_ratios(cfg, layer_id)
        n = np.arange(C, dtype=np.float64) / max(C - 1, 1)
        decay = -6 + 5 * n ** (0.7 + 1.3 * r01)
        faaaa = r01 * (1 - n) + 0.1 * (((np.arange(C) + 1) % 3) - 1)
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

    def __call__(self, x, x_prev, state, v_first=None, resets=None):
        B, T, C = x.shape
        H = self.n_head
        xx = token_shift(x, x_prev, resets)

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
        y, state = wkv6(r, w, k, v, u, state, **dict(self.wkv_kwargs), resets=resets)
        y = self._group_norm(y)
        if self.gated:
            y = y * jax.nn.silu(self.gate(mix(self.time_mix_g)).astype(F32))
        return self.output(y), x[:, -1].astype(F32), state, v_first


class TimeMix51(TimeMix5):
    """The pre-release 5.1 layout of :class:`TimeMix5` (no gate, per-head decay)."""

    gated = False


class ChannelMix5(ChannelMix4):
    """RWKV-4's channel-mix; RWKV-5 initialises the key matrix with gain 1."""

    expand_key = False


def ffn_size(C: int) -> int:
    """RWKV-5/6 channel-mix width: ``int(3.5·C) // 32 · 32``."""
    return int(3.5 * C) // 32 * 32


# the config fields every matrix-state version (5.x, 6, 7) adds
HEAD_EXTRAS = {
    "head_size": Extra(lambda C: 64, "N: channels per head (H = C / N heads)"),
    "ln_x_eps": Extra(lambda C: 64e-5, "eps of the per-head GroupNorm ln_x (official 64e-5; "
                                       "the tiny v5 fixtures were trained with 1e-5)"),
}
_ATT = "blocks.0.att."
_MIX_AXES = ((r"blocks\.\d+\.(att|ffn)\.time_mix_[kvrg]", VEC),)


def _has_ln_x(shapes) -> bool:
    return _ATT + "ln_x.weight" in shapes


def _per_channel_decay(shapes) -> bool:
    """x052 keeps a decay per head and key channel, [H, N]; 5.1 one per head, [H]."""
    td = shapes.get(_ATT + "time_decay", ())
    return len(td) == 2 and td[1] > 1


SPEC_52 = VersionSpec(
    version="5.2",
    title="RWKV-5.2 Eagle",
    time_mix=TimeMix5,
    channel_mix=ChannelMix5,
    wkv_op="wkv6",
    wkv_forms=SUPPORTED,
    extras=HEAD_EXTRAS,
    ffn_size=ffn_size,
    detect=lambda s: _has_ln_x(s) and _per_channel_decay(s),
    infer=lambda s: {"head_size": shape_of(s, _ATT + "time_faaaa", 1)},
    lr_multipliers={"time_decay": 2.0},
    names={"hf": names.HF_PREFIXED},
    lora_targets=(r"blocks\.\d+\.att\.(receptance|key|value|output|gate)\.weight",
                  r"blocks\.\d+\.ffn\.(key|value|receptance)\.weight"),
    param_axes=COMMON_PARAM_AXES + _MIX_AXES + (
        (r"blocks\.\d+\.att\.time_(decay|faaaa)", ("head", "head_dim")),  # [H, N]
    ),
)


def _infer_51(shapes) -> dict:
    n_head = shape_of(shapes, _ATT + "time_decay", 0)
    C = shape_of(shapes, "emb.weight", 1)
    return {"head_size": C // n_head if n_head and C else None}


SPEC_51 = VersionSpec(
    version="5.1",
    title="RWKV-5.1",
    time_mix=TimeMix51,
    channel_mix=ChannelMix5,
    wkv_op="wkv6",
    wkv_forms=SUPPORTED,
    extras=HEAD_EXTRAS,
    ffn_size=ffn_size,
    detect=_has_ln_x,
    infer=_infer_51,
    lr_multipliers={"time_first": 3.0, "time_decay": 2.0},
    names={"hf": names.HF_PREFIXED},
    lora_targets=(r"blocks\.\d+\.att\.(receptance|key|value|output)\.weight",  # no gate
                  r"blocks\.\d+\.ffn\.(key|value|receptance)\.weight"),
    param_axes=COMMON_PARAM_AXES + _MIX_AXES + (
        (r"blocks\.\d+\.att\.time_(decay|first)", ("head",)),  # [H]
    ),
)
