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
from compile_count import assert_compiled_once
from reference_np import reset_patterns, run_documents
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
def closed_form_f64(r, w, k, v, u, S0, resets=None):
    """Independent fp64 transcription (not a recurrence): with c the inclusive cumsum of w,

        y_t = Σ_i r_t,i e^{c_{t-1,i}} S0_i + Σ_{j<t} (Σ_i r_t,i k_j,i e^{c_{t-1,i} - c_j,i}) v_j
              + (Σ_i r_t,i u_i k_t,i) v_t
        S_T = e^{c_T} ⊙ S0 + Σ_j (k_j ⊙ e^{c_T - c_j}) v_jᵀ

    With ``resets`` (packed documents): only pairs (j, t) of one document (no reset in
    (j, t]) count, S0 only before the first reset, and S_T only holds the last document.
    Differences of fp64 cumsums are exact enough here (~1e-12 relative at T = 129)."""
    B, T = r.shape[:2]
    c = jnp.cumsum(w, axis=1)
    c_ex = jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1)
    expo = c_ex[:, :, None] - c[:, None, :]                            # [B, t, j, H, N]
    causal = (jnp.arange(T)[None, :] < jnp.arange(T)[:, None])[None, :, :, None, None]
    first = last = jnp.ones((B, T, 1, 1), jnp.bool_)
    carried = jnp.ones((B, 1, 1, 1), jnp.bool_)
    if resets is not None:
        seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)            # document of each token
        causal = causal & (seg[:, :, None] == seg[:, None, :])[..., None, None]
        first, last = (seg == 0)[..., None, None], (seg == seg[:, -1:])[..., None, None]
        carried = (seg[:, -1] == 0)[:, None, None, None]
    # mask before exp (a masked exponent can be +large); exp(-inf) has a zero gradient
    A = jnp.einsum("bthn,bjhn,btjhn->bhtj", r, k, jnp.exp(jnp.where(causal, expo, -jnp.inf)))
    bonus = jnp.sum(r * u[None, None] * k, axis=-1, keepdims=True)
    y = (jnp.einsum("bhtj,bjhn->bthn", A, v) + bonus * v
         + jnp.einsum("bthi,bhin->bthn", jnp.where(first, r * jnp.exp(c_ex), 0.0), S0))
    k_end = jnp.where(last, k * jnp.exp(c[:, -1:] - c), 0.0)
    S = (jnp.where(carried, jnp.exp(c[:, -1])[..., None] * S0, 0.0)
         + jnp.einsum("bjhi,bjhn->bhin", k_end, v))
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
    resets = reset_patterns(B, 7)["short"]
    for impl, form in cases.items():
        got = jax.make_jaxpr(functools.partial(wkv6, impl=impl, chunk_size=16))(*args)
        assert str(got) == str(jax.make_jaxpr(form)(*args)), impl
        # resets pass through: the same program as the form's with them
        got = jax.make_jaxpr(functools.partial(wkv6, impl=impl, chunk_size=16,
                                               resets=resets))(*args)
        want = jax.make_jaxpr(functools.partial(form, resets=resets))(*args)
        assert str(got) == str(want) != str(jax.make_jaxpr(form)(*args)), impl


def test_dispatch_errors():
    args = make_inputs(4, seed=13)
    with pytest.raises(ValueError, match="unknown WKV implementation"):
        wkv6(*args, impl="flash")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6_chunked(*args, chunk_size=24)
    with pytest.raises(ValueError, match="u must be"):
        wkv6_scan(*args[:4], args[4][:, :3], args[5])


# ---------------------------------------------------------------- packed documents (resets)
# patterns at and right after the sub-chunk (16) and chunk (64) boundaries
CHUNKS = (16, 64)
# The reset checks compile one gradient per form and shape: at XLA:CPU's optimisation level 0
# (the same arithmetic, LLVM without its optimisation passes) that takes a fraction of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _grads_and_values(f, dtype=jnp.float32):
    """jit(grad) of <y, gy> + <S, gS> w.r.t. (r, w, k, v, u, state) through ``f`` with
    resets, also returning (y, S): one compile per form and shape for every pattern."""

    def loss(r, w, k, v, u, S0, gy, gS, resets):
        y, S = f(r, w, k, v, u, S0, resets=resets)
        return jnp.sum(y.astype(dtype) * gy) + jnp.sum(S.astype(dtype) * gS), (y, S)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True),
                   compiler_options=FAST_COMPILE)


def _by_documents(args, resets):
    """The fp64 reference run one document at a time (no resets involved)."""
    r, w, k, v, u, S0 = as64(args)
    w = np.broadcast_to(w, k.shape)

    def run(b, s, e, carried):
        seq = (x[b:b + 1, s:e] for x in (r, w, k, v))
        return wkv6_reference(*seq, u, S0[b:b + 1] if carried else None)

    return run_documents(resets, run)


def check_resets(f, args, seed, grads=True, patterns=None):
    """Every reset pattern: y and S against the fp64 loop with resets and against each
    document run alone; gradients (inputs and initial state; finite only unless ``grads``)
    against the fp64 closed form; a reset at t = 0 gives the initial state exactly zero
    gradient."""
    B_, T = args[0].shape[:2]
    rng = np.random.default_rng(seed + 1000)
    gy, gS = rng.standard_normal((B_, T, H, N)), rng.standard_normal((B_, H, N, N))
    for name, resets in (patterns or reset_patterns(B_, T, CHUNKS)).items():
        got, (y, S) = _grads_and_values(f)(*args, gy, gS, resets)
        assert y.dtype == jnp.float32 and S.dtype == jnp.float32
        y_ref, S_ref = wkv6_reference(*as64(args), resets=resets)
        assert y_err(y, y_ref) < TOL_FP32, (name, y_err(y, y_ref))
        assert s_err(S, S_ref) < TOL_FP32, (name, s_err(S, S_ref))
        for b, (y_doc, S_doc) in enumerate(_by_documents(args, resets)):
            assert y_err(y[b:b + 1], y_doc) < TOL_FP32, (name, b)
            assert s_err(S[b:b + 1], S_doc) < TOL_FP32, (name, b)
        for name_g, g in zip(GRAD_NAMES, got):
            assert np.all(np.isfinite(g)), (name, name_g)
        assert not np.any(np.asarray(got[5])[resets[:, 0]]), name  # exactly zero
        if not grads:
            continue
        ref = _CLOSED_GRAD(*(jnp.asarray(x, jnp.float64) for x in (*as64(args), gy, gS)),
                           resets)
        for name_g, g, g_ref, ax in zip(GRAD_NAMES, got, ref, GRAD_SLICES):
            assert rel_err(g, g_ref, ax) < TOL_GRAD, (name, name_g, rel_err(g, g_ref, ax))


def _closed_loss(r, w, k, v, u, S0, gy, gS, resets):
    y, S = closed_form_f64(r, w, k, v, u, S0, resets)
    return jnp.sum(y * gy) + jnp.sum(S * gS)


_CLOSED_GRAD = jax.jit(jax.grad(_closed_loss, argnums=tuple(range(6))),
                       compiler_options=FAST_COMPILE)


def test_closed_form_with_resets_matches_numpy_loop():
    args = make_inputs(64, seed=8)
    for name, resets in reset_patterns(B, 64, CHUNKS).items():
        y_ref, S_ref = wkv6_reference(*as64(args), resets=resets)
        y, S = closed_form_f64(*(jnp.asarray(x, jnp.float64) for x in as64(args)), resets)
        assert y_err(y, y_ref) < 1e-12 and s_err(S, S_ref) < 1e-12, name


@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("form", list(FORMS))
def test_resets_match_fp64(form, T):
    check_resets(FORMS[form], make_inputs(T, seed=40 + T), seed=T)


@pytest.mark.parametrize("chunk_size,T", [(8, 21), (32, 100)])
def test_resets_other_chunk_sizes(chunk_size, T):
    f = functools.partial(wkv6_chunked, chunk_size=chunk_size)
    check_resets(f, make_inputs(T, seed=chunk_size + 1), seed=chunk_size,
                 patterns=reset_patterns(B, T, (chunk_size,)))


@pytest.mark.parametrize("decay", ["spiky", "extreme"])
@pytest.mark.parametrize("form", list(FORMS))
def test_resets_decay_patterns(form, decay):
    """Spikes of -150, and -1e3 (and -inf, clamped), with resets: no NaN/inf anywhere;
    gradients against the closed form for the spikes (it has no -inf clamp)."""
    args = make_inputs(64, seed=12, decay=decay)
    if decay == "extreme":
        args[1][:, 3] = -np.inf
    check_resets(FORMS[form], args, seed=3, grads=decay == "spiky")


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_resets_rwkv5_decay(form):
    """RWKV-5's constant [H, N] decay, broadcast inside the forms, with resets: values."""
    args = make_inputs(129, seed=11, decay="rwkv5")
    for name, resets in reset_patterns(B, 129, CHUNKS).items():
        y_ref, S_ref = wkv6_reference(*as64(args), resets=resets)
        y, S = _JIT[form](*args, resets=resets)
        assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32, name


def test_resets_step_and_decoding():
    """Decoding token by token with ``reset_t`` (the step, and the dispatcher with T = 1)
    equals the scan with resets (the dispatcher's pass-through: test_dispatch_picks_forms)."""
    r, w, k, v, u, S0 = args = make_inputs(20, seed=14)
    resets = reset_patterns(B, 20, CHUNKS)["short"]
    y, S = wkv6_scan(*args, resets=resets)
    S_step, S_one = jnp.asarray(S0), jnp.asarray(S0)
    for t in range(20):
        y_t, S_step = wkv6_step(r[:, t], w[:, t], k[:, t], v[:, t], u, S_step, resets[:, t])
        assert y_err(y_t[:, None], y[:, t:t + 1]) < TOL_FP32
        sl = slice(t, t + 1)
        y_1, S_one = wkv6(r[:, sl], w[:, sl], k[:, sl], v[:, sl], u, S_one,
                          resets=resets[:, sl])
        assert y_err(y_1, y[:, sl]) < TOL_FP32
    assert s_err(S_step, S) < TOL_FP32 and s_err(S_one, S) < TOL_FP32


@pytest.mark.parametrize("form", list(FORMS))
def test_resets_bf16_inputs(form):
    args = make_inputs(64, seed=15, dtype=jnp.bfloat16)
    resets = reset_patterns(B, 64, CHUNKS)["boundary16"]
    y_ref, S_ref = wkv6_reference(*as64(args), resets=resets)
    y, S = _JIT[form](*args, resets=resets)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert y_err(y, y_ref) < TOL_BF16 and s_err(S, S_ref) < TOL_FP32


def _loop_loss64(r, w, k, v, u, S0, gy, gS, resets):
    """The per-token recurrence in fp64 jax.numpy (differentiable), with resets."""

    def body(S, x):
        r_t, w_t, k_t, v_t, z_t = x
        S = jnp.where(z_t[:, None, None, None], 0.0, S)
        kv = k_t[..., :, None] * v_t[..., None, :]
        y = jnp.einsum("bhi,bhij->bhj", r_t, u[None, :, :, None] * kv + S)
        return jnp.exp(w_t)[..., None] * S + kv, y

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (r, w, k, v, resets))
    S, y = jax.lax.scan(body, S0, xs)
    return jnp.sum(jnp.swapaxes(y, 0, 1) * gy) + jnp.sum(S * gS)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_resets_long_sequence(form):
    """T = 1000, many documents: values and gradients (vs an fp64 per-token loop)."""
    T = 1000
    args = make_inputs(T, seed=16)
    pats = reset_patterns(B, T, CHUNKS)
    resets = pats["short"] | pats["boundary64"]
    rng = np.random.default_rng(17)
    gy, gS = rng.standard_normal((B, T, H, N)), rng.standard_normal((B, H, N, N))
    got, (y, S) = _grads_and_values(FORMS[form])(*args, gy, gS, resets)
    y_ref, S_ref = wkv6_reference(*as64(args), resets=resets)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    ref = jax.jit(jax.grad(_loop_loss64, argnums=tuple(range(6))),
                  compiler_options=FAST_COMPILE)(
        *(jnp.asarray(x, jnp.float64) for x in (*as64(args), gy, gS)), resets)
    for name_g, g, g_ref, ax in zip(GRAD_NAMES, got, ref, GRAD_SLICES):
        assert rel_err(g, g_ref, ax) < TOL_GRAD, (name_g, rel_err(g, g_ref, ax))


def test_resets_bad_shape():
    with pytest.raises(ValueError, match=r"resets must be \[B, T\]"):
        wkv6_scan(*make_inputs(4, seed=13), resets=np.zeros((B, 5), bool))


# ---------------------------------------------------------------- compile once
@pytest.mark.parametrize("form", ["step", "scan", "chunked", "associative"])
def test_eager_call_compiles_once(form):
    """The first eager call compiles, a second one with the same shapes and dtypes compiles
    nothing, with and without resets; the dispatcher reaching that form then compiles
    nothing either (it calls the same cached function). B = 3, T = 5, 6, ... per form:
    shapes no other test uses, so that the first call must compile."""
    T = 5 + ["step", "scan", "chunked", "associative"].index(form)
    rng = np.random.default_rng(5)
    r, k, v = (jnp.asarray(rng.standard_normal((3, T, H, N)), jnp.float32) for _ in range(3))
    w = jnp.asarray(-np.exp(rng.uniform(-5.0, 1.0, (3, T, H, N))), jnp.float32)
    u = jnp.asarray(rng.uniform(-1.0, 1.0, (H, N)), jnp.float32)
    S0 = jnp.asarray(rng.standard_normal((3, H, N, N)), jnp.float32)
    resets = jnp.asarray(rng.random((3, T)) < 0.5)
    x0, r0 = (r[:, 0], w[:, 0], k[:, 0], v[:, 0], u, S0), resets[:, 0]
    if form == "step":
        calls, dispatch = [lambda: wkv6_step(*x0), lambda: wkv6_step(*x0, r0)], []
    else:
        calls = [lambda: FORMS[form](r, w, k, v, u, S0),
                 lambda: FORMS[form](r, w, k, v, u, S0, resets=resets)]
        impls = [form] + (["auto"] if resolve_impl("auto", "wkv6", SUPPORTED).value == form
                          else [])
        dispatch = [lambda impl=impl: wkv6(r, w, k, v, u, S0, impl=impl) for impl in impls]
        dispatch += [lambda impl=impl: wkv6(r, w, k, v, u, S0, impl=impl, resets=resets)
                     for impl in impls]
        # the same call spelled otherwise (keywords) is the same cache entry
        dispatch.append(lambda: FORMS[form](r, w, k, v, u=u, state=S0, resets=resets))
    assert_compiled_once(calls, dispatch)
