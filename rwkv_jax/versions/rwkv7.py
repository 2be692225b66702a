"""RWKV-7 "Goose" (reference §5): generalised delta rule with vector-valued decay and
in-context learning rate, value residual from layer 0, ``r_k`` bonus; its
flash-linear-attention names (which are also its Hugging Face names); :data:`SPEC`."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import names
from rwkv_jax.model.layers import (F32, MatrixStateTimeMix, Module, heads, host_rng,
                                   init_ratios, linear, mix_vector, orthogonal, token_shift, vec)
from rwkv_jax.ops.wkv7 import SUPPORTED, wkv7
from rwkv_jax.versions.base import (COMMON_PARAM_AXES, VEC, Extra, NameMap, VersionSpec,
                                    shape_of)
from rwkv_jax.versions.rwkv5 import HEAD_EXTRAS

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
    """RWKV-7 time-mix. Call: ``(x, x_prev [B,C], S [B,H,N,N], v_first, resets)`` ->
    ``(out [B,T,C], x_prev, S, v_first)``; S is float32 in the official [value, key] layout.
    Layer 0 produces ``v_first`` (its values); later layers mix towards it. ``v_first`` is
    per token (layer 0's value of the same token, no state), so ``resets`` need not touch it."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, H, N, pd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.param_jnp_dtype
        r01, r10, ddd = init_ratios(cfg, layer_id)
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

    def __call__(self, x, x_prev, state, v_first=None, resets=None):
        B, T, C = x.shape
        H = self.n_head
        x = x.astype(F32)
        dx = token_shift(x, x_prev, resets) - x
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
                        **dict(self.wkv_kwargs), resets=resets)
        y = self._group_norm(y)
        bonus = jnp.sum(r_h * k_h * p(self.r_k)[None, None], axis=-1, keepdims=True) * v_h
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], state, v_first


class ChannelMix7(Module):
    """RWKV-7 channel-mix: ``relu(Wk(x + dx·x_k))² @ Wv.T``; F = 4C, no receptance gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        C, F, pd = cfg.n_embd, cfg.ffn_size, cfg.param_jnp_dtype
        _, r10, ddd = init_ratios(cfg, layer_id)
        self.x_k = mix_vector(1 - ddd ** (r10 ** 4), pd)
        self.key = linear(cfg, rngs, C, F, 1.0)
        self.value = linear(cfg, rngs, F, C, 0.0)

    def __call__(self, x, x_prev, resets=None):
        x = x.astype(F32)
        dx = token_shift(x, x_prev, resets) - x
        k = jnp.square(jax.nn.relu(self.key(x + dx * vec(self.x_k))))
        return self.value(k).astype(F32), x[:, -1]


# flash-linear-attention RWKV-7 (its utils/convert_from_rwkv7.py, reference §5.2):
# layer parts renamed, LoRA x1/x2 stored transposed as lora.0/lora.2 weights, x0 as the
# lora.2 bias, and [1, 1, C] vectors squeezed to [C] except attn.x_*.
_FLA7_PARTS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn",
               "ffn": "ffn"}
_FLA7_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
              "ln_x": "g_norm"}
_FLA7_PARTS_BACK = {v: k for k, v in _FLA7_PARTS.items()}
_FLA7_PROJ_BACK = {v: k for k, v in _FLA7_PROJ.items()}


def _official_to_fla7(key: str, value):
    if key in names.FLA_TOP:
        return names.FLA_TOP[key], value
    _, i, part, name, *rest = key.split(".")
    transpose = False
    if m := re.fullmatch(r"([wavg])([012])", name):
        name = f"{m.group(1)}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[
            m.group(2)]
        transpose = m.group(2) != "0"
    elif part == "att" and name in _FLA7_PROJ:
        name = _FLA7_PROJ[name]
    value = np.asarray(value)
    if transpose:
        value = value.T
    elif value.ndim == 3 and value.shape[:2] == (1, 1) and not (part == "att"
                                                                  and name.startswith("x_")):
        value = value.reshape(-1)
    return ".".join(["model.layers", i, _FLA7_PARTS[part], name, *rest]), value


def _fla7_to_official(key: str, value):
    if key in names.FLA_TOP_BACK:
        return names.FLA_TOP_BACK[key], value
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key)
    if not m:
        return key, value
    i, part, rest = m.groups()
    part = _FLA7_PARTS_BACK.get(part, part)
    value = np.asarray(value)
    if lm := re.fullmatch(r"([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)", rest):
        n = {"2.bias": "0", "0.weight": "1", "2.weight": "2"}[lm.group(2)]
        rest = lm.group(1) + n
        value = value.reshape(1, 1, -1) if n == "0" else value.T
    else:
        head, *tail = rest.split(".")
        rest = ".".join([_FLA7_PROJ_BACK.get(head, head), *tail])
        if value.ndim == 1 and rest in ("k_k", "k_a", "x_k"):
            value = value.reshape(1, 1, -1)
    return f"blocks.{i}.{part}.{rest}", value


_FLA7_MARK = re.compile(r"model\.layers\.\d+\.attn\.(r_k|k_k|k_a|[wa]_lora\.)")

FLA7 = NameMap(
    name="fla",
    recognise=lambda keys: any(_FLA7_MARK.match(k) for k in keys),
    to_official=lambda tensors: dict(_fla7_to_official(k, v) for k, v in tensors.items()),
    from_official=lambda tensors: dict(_official_to_fla7(k, v) for k, v in tensors.items()),
)


def lora_ranks(n_embd: int) -> tuple[int, int, int, int]:
    """RWKV-7 (w, a, v, g) LoRA ranks of the x070 code: ``max(32, round(k·√C/32)·32)`` with
    k = 1.8, 1.8, 1.3 and ``0.6·C^0.8`` for g (Python's round). C=768 -> (64, 64, 32, 128),
    C=2048 -> (96, 96, 64, 256) as the released 0.1B and 1.5B models."""
    def r(x):
        return max(32, round(x / 32) * 32)
    s = n_embd ** 0.5
    return r(1.8 * s), r(1.8 * s), r(1.3 * s), r(0.6 * n_embd ** 0.8)


_ATT = "blocks.0.att."


def _infer(shapes) -> dict:
    L = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    last = f"blocks.{L - 1}.att."  # layer 0 has no value residual (v1/v2)
    return {"head_size": shape_of(shapes, _ATT + "r_k", 1),
            "d_decay": shape_of(shapes, _ATT + "w1", 1), "d_aaa": shape_of(shapes, _ATT + "a1", 1),
            "d_gate": shape_of(shapes, _ATT + "g1", 1), "d_mv": shape_of(shapes, last + "v1", 1)
            or lora_ranks(shape_of(shapes, "emb.weight", 1) or 64)[2]}


SPEC = VersionSpec(
    version="7",
    title="RWKV-7 Goose",
    time_mix=TimeMix7,
    channel_mix=ChannelMix7,
    wkv_op="wkv7",
    wkv_forms=SUPPORTED,
    extras={**HEAD_EXTRAS,
            "d_decay": Extra(lambda C: lora_ranks(C)[0], "rank of the decay LoRA w1/w2"),
            "d_aaa": Extra(lambda C: lora_ranks(C)[1], "rank of the in-context learning-rate "
                                                       "LoRA a1/a2"),
            "d_mv": Extra(lambda C: lora_ranks(C)[2], "rank of the value-residual LoRA v1/v2"),
            "d_gate": Extra(lambda C: lora_ranks(C)[3], "rank of the gate LoRA g1/g2")},
    ffn_size=lambda C: 4 * C,
    detect=lambda shapes: _ATT + "r_k" in shapes or _ATT + "x_r" in shapes,
    infer=_infer,
    lr_multipliers={"w0": 2.0},
    names={"hf": FLA7, "fla": FLA7},
    unused_keys=(r"blocks\.0\.att\.v[012]",),  # layer 0 has no value residual
    # the gate is the g1/g2 low-rank pair (no Linear); the channel-mix has no receptance
    lora_targets=(r"blocks\.\d+\.att\.(receptance|key|value|output)\.weight",
                  r"blocks\.\d+\.ffn\.(key|value)\.weight"),
    param_axes=COMMON_PARAM_AXES + (
        (r"blocks\.\d+\.(att|ffn)\.x_[rwkvag]|blocks\.\d+\.att\.([wav]0|k_k|k_a)", VEC),
        (r"blocks\.\d+\.att\.[wavg]1", ("embed", "lora")),
        (r"blocks\.\d+\.att\.[wavg]2", ("lora", "heads")),
        (r"blocks\.\d+\.att\.r_k", ("head", "head_dim")),
    ),
)
