"""RWKV-6 "Finch" (reference §4): data-dependent token shift ("ddlerp", LoRA
``time_maa_w1/w2``) and data-dependent per-token decay (``time_decay_w1/w2``); its
flash-linear-attention names; :data:`SPEC`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import names
from rwkv_jax.model.layers import (F32, MatrixStateTimeMix, Module, heads, init_ratios, linear,
                                   mix_vector, param_uniform, token_shift, vec)
from rwkv_jax.ops.wkv6 import SUPPORTED, wkv6
from rwkv_jax.versions.base import (COMMON_PARAM_AXES, VEC, Extra, NameMap, VersionSpec,
                                    shape_of)
from rwkv_jax.versions.rwkv5 import HEAD_EXTRAS, ffn_size


class TimeMix6(MatrixStateTimeMix):
    """RWKV-6 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first, resets)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the [key, value] layout."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        D, Dw = cfg.d_mix, cfg.d_decay
        r01, r10, ddd = init_ratios(cfg, layer_id)
        n = np.arange(C, dtype=np.float64) / max(C - 1, 1)
        self.time_maa_x = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_w = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_k = mix_vector(1 - ddd ** r10, pd)
        self.time_maa_v = mix_vector(1 - (ddd ** r10 + 0.3 * r01), pd)
        self.time_maa_r = mix_vector(1 - ddd ** (0.5 * r10), pd)
        self.time_maa_g = mix_vector(1 - ddd ** (0.5 * r10), pd)
        self.time_maa_w1 = nnx.Param(jnp.zeros((C, 5 * D), pd))
        self.time_maa_w2 = param_uniform(rngs, (5, D, C), 0.01, pd)
        self.time_decay = mix_vector(-6 + 5 * n ** (0.7 + 1.3 * r01), pd)
        self.time_decay_w1 = nnx.Param(jnp.zeros((C, Dw), pd))
        self.time_decay_w2 = param_uniform(rngs, (Dw, C), 0.01, pd)
        faaaa = r01 * (1 - n) + 0.1 * (((np.arange(C) + 1) % 3) - 1)
        self.time_faaaa = nnx.Param(jnp.asarray(faaaa.reshape(H, N), F32).astype(pd))
        self._init_projections(cfg, layer_id, rngs)
        self.gate = linear(cfg, rngs, C, C, 0.1)

    def __call__(self, x, x_prev, state, v_first=None, resets=None):
        B, T, C = x.shape
        H = self.n_head
        x = x.astype(F32)
        dx = token_shift(x, x_prev, resets) - x
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
        y, state = wkv6(r, w, k, v, u, state, **dict(self.wkv_kwargs), resets=resets)
        return self.output(self._group_norm(y) * g), x[:, -1], state, v_first


class ChannelMix6(Module):
    """RWKV-6 channel-mix: ``xk = x + dx·maa_k``, ``xr = x + dx·maa_r``, then as RWKV-4."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = init_ratios(cfg, layer_id)
        self.time_maa_k = mix_vector(1 - ddd ** (r10 ** 3), pd)
        self.time_maa_r = mix_vector(1 - ddd ** (r10 ** 3), pd)
        self.key = linear(cfg, rngs, C, F, 1.0)
        self.receptance = linear(cfg, rngs, C, C, 0.0)
        self.value = linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev, resets=None):
        x = x.astype(F32)
        dx = token_shift(x, x_prev, resets) - x
        k = jnp.square(jax.nn.relu(self.key(x + dx * vec(self.time_maa_k))))
        r = jax.nn.sigmoid(self.receptance(x + dx * vec(self.time_maa_r)).astype(F32))
        return r * self.value(k).astype(F32), x[:, -1]


# flash-linear-attention RWKV-6 (its utils/convert_from_rwkv6.py and fla/layers/rwkv6.py at
# commit bc3b101dcb71, reference §4.2). FLA orders the five ddlerp mixes (r, w, k, v, g); the
# official x060 code orders them (w, k, v, r, g). time_maa_w1 [C, 5*D] becomes
# x_proj.0.linear.weight [5*D, C] (column blocks re-ordered, then transposed); time_maa_w2
# [5, D, C] becomes x_proj.2.weight [C, 5*D] (first axis re-ordered, flattened, transposed);
# the five time_maa_{r,w,k,v,g} [1,1,C] are stacked into x_bias [5, C]; the other
# [1, 1, C] vectors are squeezed to [C]; time_decay_w1/w2 are stored transposed.
_FLA6_MIX = "rwkvg"  # FLA's order of the mixes (x_proj output blocks, x_bias rows)
_OFFICIAL6_MIX = "wkvrg"  # official order (time_maa_w1 column blocks, time_maa_w2 rows)
_FLA6_PERM = [_OFFICIAL6_MIX.index(c) for c in _FLA6_MIX]  # official block of FLA block n
_FLA6_PERM_BACK = [_FLA6_MIX.index(c) for c in _OFFICIAL6_MIX]
# official key after "blocks.N." -> (FLA key after "model.layers.N.", layout transform)
_FLA6 = {
    "ln0.weight": ("pre_norm.weight", None), "ln0.bias": ("pre_norm.bias", None),
    "ln1.weight": ("attn_norm.weight", None), "ln1.bias": ("attn_norm.bias", None),
    "ln2.weight": ("ffn_norm.weight", None), "ln2.bias": ("ffn_norm.bias", None),
    "att.time_maa_x": ("attn.x_proj.0.mu", "squeeze"),
    "att.time_maa_w1": ("attn.x_proj.0.linear.weight", "maa_w1"),
    "att.time_maa_w2": ("attn.x_proj.2.weight", "maa_w2"),
    "att.time_decay": ("attn.w_proj.linear.lora.2.bias", "squeeze"),
    "att.time_decay_w1": ("attn.w_proj.linear.lora.0.weight", "transpose"),
    "att.time_decay_w2": ("attn.w_proj.linear.lora.2.weight", "transpose"),
    "att.time_faaaa": ("attn.bonus", None),
    "att.receptance.weight": ("attn.r_proj.linear.weight", None),
    "att.key.weight": ("attn.k_proj.linear.weight", None),
    "att.value.weight": ("attn.v_proj.linear.weight", None),
    "att.gate.weight": ("attn.g_proj.linear.weight", None),
    "att.output.weight": ("attn.o_proj.weight", None),
    "att.ln_x.weight": ("attn.g_norm.weight", None),
    "att.ln_x.bias": ("attn.g_norm.bias", None),
    "ffn.time_maa_k": ("ffn.key.mu", "squeeze"),
    "ffn.time_maa_r": ("ffn.receptance.mu", "squeeze"),
    "ffn.key.weight": ("ffn.key.linear.weight", None),
    "ffn.receptance.weight": ("ffn.receptance.linear.weight", None),
    "ffn.value.weight": ("ffn.value.weight", None),
}
_FLA6_BACK = {fla: (official, how) for official, (fla, how) in _FLA6.items()}
_FLA6_BIAS = "attn.x_bias"  # stack of att.time_maa_{r,w,k,v,g}
_FLA6_MARK = re.compile(r"model\.layers\.\d+\.attn\.(x_bias$|bonus$|x_proj\.|w_proj\.)")


def _fla6_value(value, how: str | None, back: bool):
    """One tensor's layout change (``back``: FLA -> official). A tensor whose shape the
    change does not fit passes unchanged, so the model's shape check reports it."""
    value = np.asarray(value)
    shape = value.shape
    if how == "squeeze":  # official [1, 1, C] <-> FLA [C]
        if back:
            return value.reshape(1, 1, -1) if value.ndim == 1 else value
        return value.reshape(-1) if value.ndim == 3 and shape[:2] == (1, 1) else value
    if how == "transpose":
        return value.T if value.ndim == 2 else value
    if how == "maa_w1":  # official [C, 5*D] (blocks w,k,v,r,g) <-> FLA [5*D, C] (r,w,k,v,g)
        if value.ndim != 2 or shape[0 if back else 1] % 5:
            return value
        if back:
            c, m = shape[1], shape[0]
            return value.T.reshape(c, 5, m // 5)[:, _FLA6_PERM_BACK].reshape(c, m)
        c, m = shape
        return value.reshape(c, 5, m // 5)[:, _FLA6_PERM].reshape(c, m).T
    if how == "maa_w2":  # official [5, D, C] (w,k,v,r,g) <-> FLA [C, 5*D] (r,w,k,v,g)
        if back:
            if value.ndim != 2 or shape[1] % 5:
                return value
            c, m = shape
            return value.T.reshape(5, m // 5, c)[_FLA6_PERM_BACK]
        if value.ndim != 3 or shape[0] != 5:
            return value
        return value[_FLA6_PERM].reshape(-1, shape[2]).T
    return value


def _official_to_fla6(tensors: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mixes: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key in names.FLA_TOP:  # emb / ln_out / head: same names as FLA's RWKV-7
            out[names.FLA_TOP[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        if mix := re.fullmatch(r"att\.time_maa_([rwkvg])", rest):
            mixes.setdefault(i, {})[mix.group(1)] = value
        elif rest in _FLA6:
            name, how = _FLA6[rest]
            out[f"model.layers.{i}.{name}"] = _fla6_value(value, how, back=False)
        else:
            out[key] = value
    for i, mix in mixes.items():
        rows = [np.asarray(mix.get(c, ())).reshape(-1) for c in _FLA6_MIX]
        if len(mix) == 5 and len({r.shape for r in rows}) == 1:
            out[f"model.layers.{i}.{_FLA6_BIAS}"] = np.stack(rows)
        else:  # an incomplete or ragged set cannot be stacked: keep the official keys
            out.update({f"blocks.{i}.att.time_maa_{c}": v for c, v in mix.items()})
    return out


def _fla6_to_official(tensors: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key in names.FLA_TOP_BACK:
            out[names.FLA_TOP_BACK[key]] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        value = np.asarray(value)
        if rest == _FLA6_BIAS and value.ndim == 2 and len(value) == 5:
            for c, row in zip(_FLA6_MIX, value):
                out[f"blocks.{i}.att.time_maa_{c}"] = row.reshape(1, 1, -1)
        elif rest in _FLA6_BACK:
            name, how = _FLA6_BACK[rest]
            out[f"blocks.{i}.{name}"] = _fla6_value(value, how, back=True)
        else:  # unknown (or a misshapen x_bias): the model check lists it under its own name
            out[key] = value
    return out


FLA6 = NameMap(
    name="fla",
    recognise=lambda keys: any(_FLA6_MARK.match(k) for k in keys),
    to_official=_fla6_to_official,
    from_official=_official_to_fla6,
)
_ATT = "blocks.0.att."


def _infer(shapes) -> dict:
    d_mix = shape_of(shapes, _ATT + "time_maa_w1", 1)
    return {"head_size": shape_of(shapes, _ATT + "time_faaaa", 1),
            "d_mix": d_mix // 5 if d_mix else None,
            "d_decay": shape_of(shapes, _ATT + "time_decay_w1", 1)}


SPEC = VersionSpec(
    version="6",
    title="RWKV-6 Finch",
    time_mix=TimeMix6,
    channel_mix=ChannelMix6,
    wkv_op="wkv6",
    wkv_forms=SUPPORTED,
    extras={**HEAD_EXTRAS,
            "d_mix": Extra(lambda C: 32, "rank of the ddlerp LoRA time_maa_w1/w2 (x060: 32)"),
            "d_decay": Extra(lambda C: 64, "rank of the decay LoRA time_decay_w1/w2 "
                                           "(x060: 64)")},
    ffn_size=ffn_size,
    detect=lambda shapes: _ATT + "time_maa_x" in shapes,
    infer=_infer,
    lr_multipliers={"time_decay": 2.0},
    names={"hf": names.HF_PREFIXED, "fla": FLA6},
    lora_targets=(r"blocks\.\d+\.att\.(receptance|key|value|output|gate)\.weight",
                  r"blocks\.\d+\.ffn\.(key|value|receptance)\.weight"),
    param_axes=COMMON_PARAM_AXES + (
        (r"blocks\.\d+\.(att|ffn)\.time_maa_[xwkvrg]|blocks\.\d+\.att\.time_decay", VEC),
        (r"blocks\.\d+\.att\.time_(maa|decay)_w1", ("embed", "lora")),
        (r"blocks\.\d+\.att\.time_maa_w2", (None, "lora", "embed")),  # [5, D, C]
        (r"blocks\.\d+\.att\.time_decay_w2", ("lora", "heads")),
        (r"blocks\.\d+\.att\.time_faaaa", ("head", "head_dim")),
    ),
)
