"""RWKV-5/6 WKV: every form against an fp64 numpy transcription, each other and fp64 gradients.

Error metric (``rel_err``): for each slice along the "slice" axes (batch and head, where an
array has them) the max absolute error divided by the max |reference| of that slice; the
worst slice is reported. y and S vary in scale by orders of magnitude between heads/decays,
so each head is judged against its own scale; an error relative to max|ref| is the natural
fp32 yardstick for sums that can cancel.

Decays span the whole RWKV-6 range, lw = -exp(w_raw) from -1e-5 (w_raw ≈ -11.5) to ≈ -150
(w_raw ≈ +5): per key channel a base spread over that range with per-token jitter, so one
head holds long-memory and near-instant-forget channels side by side.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_np_wkv6 import wkv6_reference

from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv6 import (SUPPORTED, wkv6, wkv6_associative, wkv6_chunked, wkv6_scan,
                               wkv6_step)

B, H, N = 2, 2, 16
LW_WEAK, LW_STRONG = np.log(1e-5), np.log(150.0)  # bounds of w_raw, lw = -exp(w_raw)
FORMS = {"scan": wkv6_scan, "chunked": wkv6_chunked, "associative": wkv6_associative}
_JIT = {name: jax.jit(f) for name, f in FORMS.items()}
_wkv6 = jax.jit(wkv6, static_argnames=("impl", "chunk_size"))

# Measured (CPU): values <= 3e-7 for T <= 129, 4e-6 for the scan at T = 1000 (sequential
# rounding in weak-decay channels), chunked 2e-7 at T = 1000; gradients <= 6e-7 at T = 129.
TOL_FP32 = 1e-5                # fp32 forms vs the fp64 reference (values and final state)
TOL_GRAD = 1e-5                # fp32 gradients vs fp64 gradients
TOL_BF16 = 2.0**-8 + TOL_FP32  # bf16 y: rounding to 8 significant bits costs <= 2^-8 relative


def rel_err(got, ref, slice_axes):
    """Worst over slices (``slice_axes`` kept) of max|got - ref| / max|ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    red = tuple(a for a in range(ref.ndim) if a not in slice_axes)
    scale = np.maximum(np.max(np.abs(ref), axis=red), 1e-30)
    return float(np.max(np.max(np.abs(got - ref), axis=red) / scale))


def y_err(got, ref):  # y [B, T, H, N]
    return rel_err(got, ref, (0, 2))


def s_err(got, ref):  # S [B, H, N, N]
    return rel_err(got, ref, (0, 1))


def make_inputs(T, seed=0, decay="mixed", dtype=np.float32):
    """r, k, v ~ N(0, 1); u ~ U[-1, 1]; a non-zero initial state; log decays per ``decay``."""
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    u = rng.uniform(-1.0, 1.0, (H, N))
    S0 = rng.standard_normal((B, H, N, N))
    if decay == "mixed":  # per-channel base over the whole range, jittered per token
        base = np.linspace(LW_WEAK, LW_STRONG, H * N).reshape(H, N)[rng.permutation(H)]
        w_raw = np.clip(base + 0.7 * rng.standard_normal((B, T, H, N)), LW_WEAK, LW_STRONG)
        w = -np.exp(w_raw)
    elif decay == "spiky":  # weak decays with rare ~-150 spikes: exposes cancelling cumsums
        w = -np.exp(rng.uniform(LW_WEAK, np.log(0.05), (B, T, H, N)))
        w = np.where(rng.random((B, T, H, N)) < 0.08, -150.0, w)
    elif decay == "extreme":  # beyond the parametrisation: -1e3, with a few -1e-5
        w = np.where(rng.random((B, T, H, N)) < 0.1, -1e-5, -1e3)
    elif decay == "rwkv5":  # constant over time, per (head, key channel)
        w = -np.exp(rng.uniform(LW_WEAK, LW_STRONG, (H, N)))
    else:
        raise ValueError(decay)
    cast = lambda x: np.asarray(x, np.float32).astype(dtype)  # noqa: E731
    return (cast(r), cast(w), cast(k), cast(v), np.asarray(u, np.float32),
            np.asarray(S0, np.float32))


def as64(xs):
    return [np.asarray(x, np.float64) for x in xs]


# ---------------------------------------------------------------- values vs fp64 reference
@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_match_fp64_reference(form, T):
    args = make_inputs(T, seed=T)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = _JIT[form](*args)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert y.shape == (B, T, H, N) and S.shape == (B, H, N, N)
    assert y_err(y, y_ref) < TOL_FP32
    assert s_err(S, S_ref) < TOL_FP32


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_long_sequence_matches_fp64_reference(form):
    args = make_inputs(1000, seed=3)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = _JIT[form](*args)
    assert y_err(y, y_ref) < TOL_FP32
    assert s_err(S, S_ref) < TOL_FP32


@pytest.mark.parametrize("chunk_size,T", [(8, 21), (32, 100), (128, 129)])
def test_chunked_other_chunk_sizes(chunk_size, T):
    args = make_inputs(T, seed=chunk_size)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = jax.jit(wkv6_chunked, static_argnames="chunk_size")(*args, chunk_size=chunk_size)
    assert y_err(y, y_ref) < TOL_FP32
    assert s_err(S, S_ref) < TOL_FP32


@pytest.mark.parametrize("decay", ["spiky", "rwkv5"])
@pytest.mark.parametrize("form", list(FORMS))
def test_decay_patterns(form, decay):
    """Weak decays right after a ~-150 spike; RWKV-5's [H, N] decay broadcast over (B, T)."""
    args = make_inputs(129, seed=11, decay=decay)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = _JIT[form](*args)
    assert y_err(y, y_ref) < TOL_FP32
    assert s_err(S, S_ref) < TOL_FP32


# ---------------------------------------------------------------- state carrying
@pytest.mark.parametrize("form", list(FORMS))
def test_prefix_then_continued_state_equals_whole(form):
    r, w, k, v, u, S0 = make_inputs(71, seed=5)
    y, S = _JIT[form](r, w, k, v, u, S0)
    cut = 7  # not a chunk boundary; the rest (64 tokens) straddles the whole's chunk boundary
    y1, S1 = _JIT[form](r[:, :cut], w[:, :cut], k[:, :cut], v[:, :cut], u, S0)
    y2, S2 = _JIT[form](r[:, cut:], w[:, cut:], k[:, cut:], v[:, cut:], u, S1)
    assert y_err(np.concatenate([y1, y2], axis=1), y) < TOL_FP32
    assert s_err(S2, S) < TOL_FP32


def test_step_by_step_equals_whole():
    r, w, k, v, u, S0 = make_inputs(20, seed=6)
    y, S = _JIT["scan"](r, w, k, v, u, S0)
    step = jax.jit(wkv6_step)
    S_step, S_one = jnp.asarray(S0), jnp.asarray(S0)
    for t in range(20):
        y_t, S_step = step(r[:, t], w[:, t], k[:, t], v[:, t], u, S_step)
        assert y_t.dtype == jnp.float32 and S_step.dtype == jnp.float32
        assert y_err(y_t[:, None], y[:, t:t + 1]) < TOL_FP32
        # decoding through the dispatcher is the same code with T = 1
        sl = slice(t, t + 1)
        y_1, S_one = _wkv6(r[:, sl], w[:, sl], k[:, sl], v[:, sl], u, S_one)
        assert y_err(y_1, y[:, sl]) < TOL_FP32
    assert s_err(S_step, S) < TOL_FP32
    assert s_err(S_one, S) < TOL_FP32


def test_zero_state_default():
    """state=None is the zero state (built in the shared argument preparation)."""
    r, w, k, v, u, _ = make_inputs(7, seed=7)
    y_ref, S_ref = wkv6_reference(*as64((r, w, k, v, u)))
    for name in ("scan", "chunked"):
        y, S = _JIT[name](r, w, k, v, u)
        assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32


# ---------------------------------------------------------------- gradients vs fp64
def closed_form_f64(r, w, k, v, u, S0):
    """Independent fp64 transcription (not a recurrence): with c the inclusive cumsum of w,

        y_t = Σ_i r_t,i e^{c_{t-1,i}} S0_i + Σ_{j<t} (Σ_i r_t,i k_j,i e^{c_{t-1,i} - c_j,i}) v_j
              + (Σ_i r_t,i u_i k_t,i) v_t
        S_T = e^{c_T} ⊙ S0 + Σ_j (k_j ⊙ e^{c_T - c_j}) v_jᵀ

    Differences of fp64 cumsums are exact enough here (~1e-12 relative at T = 129)."""
    T = r.shape[1]
    c = jnp.cumsum(w, axis=1)
    c_ex = jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1)
    expo = c_ex[:, :, None] - c[:, None, :]                            # [B, t, j, H, N]
    causal = (jnp.arange(T)[None, :] < jnp.arange(T)[:, None])[None, :, :, None, None]
    # mask before exp (a masked exponent can be +large); exp(-inf) has a zero gradient
    A = jnp.einsum("bthn,bjhn,btjhn->bhtj", r, k, jnp.exp(jnp.where(causal, expo, -jnp.inf)))
    bonus = jnp.sum(r * u[None, None] * k, axis=-1, keepdims=True)
    y = (jnp.einsum("bhtj,bjhn->bthn", A, v) + bonus * v
         + jnp.einsum("bthi,bhin->bthn", r * jnp.exp(c_ex), S0))
    k_end = k * jnp.exp(c[:, -1:] - c)
    S = jnp.exp(c[:, -1])[..., None] * S0 + jnp.einsum("bjhi,bjhn->bhin", k_end, v)
    return y, S


def test_closed_form_reference_matches_numpy_loop():
    args = make_inputs(64, seed=8)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = closed_form_f64(*(jnp.asarray(x, jnp.float64) for x in as64(args)))
    assert y_err(y, y_ref) < 1e-12 and s_err(S, S_ref) < 1e-12


@functools.cache
def _grad_fn(f, dtype):
    """jit(grad) of <y, gy> + <S, gS> w.r.t. (r, w, k, v, u, state), cached per form."""

    def loss(r, w, k, v, u, S0, gy, gS):
        y, S = f(r, w, k, v, u, S0)
        return jnp.sum(y.astype(dtype) * gy) + jnp.sum(S.astype(dtype) * gS)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def grads(f, args, dtype, seed=0):
    rng = np.random.default_rng(seed + 1000)
    B_, T = args[0].shape[:2]
    gy = rng.standard_normal((B_, T, H, N))
    gS = rng.standard_normal((B_, H, N, N))
    return _grad_fn(f, dtype)(*(jnp.asarray(x, dtype) for x in (*args, gy, gS)))


# slice axes per argument (r, w, k, v, u, S0): per (batch, head) where present, per head for u
GRAD_SLICES = ((0, 2), (0, 2), (0, 2), (0, 2), (0,), (0, 1))
GRAD_NAMES = ("r", "w", "k", "v", "u", "state")


@pytest.mark.parametrize("T", [7, 64, 129])
@pytest.mark.parametrize("form", list(FORMS))
def test_gradients_match_fp64(form, T):
    args = make_inputs(T, seed=20 + T)
    ref = grads(closed_form_f64, as64(args), jnp.float64, seed=T)
    got = grads(FORMS[form], args, jnp.float32, seed=T)
    for name, g, g_ref, ax in zip(GRAD_NAMES, got, ref, GRAD_SLICES):
        assert g.dtype == jnp.float32
        assert np.all(np.isfinite(g)), name
        assert rel_err(g, g_ref, ax) < TOL_GRAD, name


# ---------------------------------------------------------------- bf16, dtypes, extremes
@pytest.mark.parametrize("form", list(FORMS))
def test_bf16_inputs(form):
    """bf16 r, w, k, v: y comes back in bf16, the state stays fp32 and exact to fp32 level
    (the reference sees the same bf16-rounded inputs, so only our rounding is measured)."""
    args = make_inputs(64, seed=9, dtype=jnp.bfloat16)
    y_ref, S_ref = wkv6_reference(*as64(args))
    y, S = _JIT[form](*args)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert y_err(y, y_ref) < TOL_BF16
    assert s_err(S, S_ref) < TOL_FP32


@pytest.mark.parametrize("form", list(FORMS))
def test_extreme_decay_is_finite(form):
    """lw = -1e3 (and -inf, clamped) in values and gradients: no NaN/inf, still correct."""
    r, w, k, v, u, S0 = make_inputs(64, seed=10, decay="extreme")
    w[:, 3] = -np.inf
    y_ref, S_ref = wkv6_reference(*as64((r, w, k, v, u, S0)))
    y, S = _JIT[form](r, w, k, v, u, S0)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(S))
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    for name, g in zip(GRAD_NAMES, grads(FORMS[form], (r, w, k, v, u, S0), jnp.float32)):
        assert np.all(np.isfinite(g)), name


# ---------------------------------------------------------------- dispatch
def test_dispatch_picks_forms():
    """wkv6(impl=X) traces to exactly form X's program; AUTO to the platform's choice."""
    args = make_inputs(7, seed=12)
    cases = {"scan": wkv6_scan, "associative": wkv6_associative,
             "chunked": functools.partial(wkv6_chunked, chunk_size=16)}
    cases[WkvImpl.AUTO] = cases[resolve_impl("auto", "wkv6", SUPPORTED).value]
    cases[WkvImpl.SCAN] = wkv6_scan
    for impl, form in cases.items():
        got = jax.make_jaxpr(functools.partial(wkv6, impl=impl, chunk_size=16))(*args)
        assert str(got) == str(jax.make_jaxpr(form)(*args)), impl


def test_dispatch_errors():
    args = make_inputs(4, seed=13)
    with pytest.raises(ValueError, match="unknown WKV implementation"):
        wkv6(*args, impl="flash")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6_chunked(*args, chunk_size=24)
    with pytest.raises(ValueError, match="u must be"):
        wkv6_scan(*args[:4], args[4][:, :3], args[5])
