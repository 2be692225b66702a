"""RWKV-4 WKV: every form against fp64 references, for values, state and gradients.

References (both float64, neither imports library code):
  * ``reference_np.wkv4_ref``: the official stable (aa, bb, pp) recurrence in numpy;
  * ``_closed_form`` below: wkv_t written directly as a log-sum-exp weighted average over the
    past tokens, the bonus token and the initial state, in jax.numpy (so it can be
    differentiated); it is checked against ``wkv4_ref`` to ~1e-13.

Error metrics (why these): wkv_t is a convex combination of the values v_i and of the initial
state's value ``aa/bb`` (itself a combination of earlier values), so |y| <= S, the largest
|v| the channel has seen (warm-up included). fp32 errors scale with S, not with |y| (which
can be ~0 by cancellation), so outputs are compared as ``max |y - y_ref| / S`` per (batch,
channel). The state ``(aa, bb, pp)`` is not unique (``a = aa·e^pp``: any shift of pp with a
rescale of aa, bb is the same state), so it is compared through two invariants:
``a/b = aa/bb`` (again a convex combination, judged against S) and ``log b = pp + log bb``
(absolute error over ``max(1, |log b|)``: fp32 holds log b to a relative 2^-24).
Gradients are compared per channel, relative to that channel's largest reference gradient,
with a floor of 1% of the array's largest (channels whose gradient is all underflow or
cancellation, e.g. at w = -400, are judged against that floor).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_count import assert_compiled_once
from reference_np import reset_patterns, run_documents, wkv4_ref
from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv4 import (SUPPORTED, Wkv4State, wkv4, wkv4_associative, wkv4_scan,
                               wkv4_step)

B, C = 2, 16
WARMUP = 20
TOL_FP32 = 1e-5        # outputs and state vs the fp64 reference (metrics in the docstring)
TOL_GRAD = 1e-4        # fp32 gradients vs fp64 closed-form gradients
TOL_SAME = 1e-6        # the same fp32 operations in the same order (jit vs eager, step vs scan)
TOL_SPLIT = 1e-5       # fp32 results of the same sequence, reassociated (split, scan vs tree)
TOL_CLOSED = 1e-12     # the two fp64 references against each other

FORMS = {
    "scan": wkv4_scan,
    "associative": wkv4_associative,
    "wkv4[scan]": functools.partial(wkv4, impl="scan"),
    "wkv4[associative]": functools.partial(wkv4, impl=WkvImpl.ASSOCIATIVE),
    "wkv4[auto]": functools.partial(wkv4, impl="auto"),
}
# The Pallas kernels (WkvImpl.PALLAS) are tested in test_kernels_wkv4.py.
# XLA:CPU spends up to ~10 s compiling one associative scan (15 s for its backward) at the
# default optimisation level; level 0 (LLVM without its optimisation passes; the arithmetic
# XLA emits is the same) takes a third of that. test_jit_matches_eager also runs the default.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
JIT = {name: jax.jit(f, compiler_options=FAST_COMPILE) for name, f in FORMS.items()}
# The value matrix runs the forms and the dispatch models use (AUTO); that ``wkv4`` with
# an explicit impl returns exactly that form's result is checked once, bit for bit, in
# test_dispatch_is_the_form (a second compile per T of the same associative scan costs ~5 s).
MATRIX = ["scan", "associative", "wkv4[auto]"]


# ----------------------------------------------------------------------------- inputs

@functools.lru_cache(maxsize=None)
def _case(T: int, kind: str = "extreme", seed: int = 0):
    """Inputs (float64 numpy) ``w, u, k, v, (aa, bb, pp), S``; state from a random warm-up.

    extreme: per-step decay e^w from 0.99999 (w = log 0.99999) down to e^-400, log-spaced
    across channels; |k| up to 60 (per-channel bound cycling 60, 2, 20, 6 so that every
    bound meets slow and fast decays); bonus u from -5 to 8.
    moderate: e^w in [0.05, 0.999], |k| <= 5, u in [-2, 3].
    """
    rng = np.random.default_rng([T, seed, kind == "extreme"])
    if kind == "extreme":
        w = -np.geomspace(-np.log(0.99999), 400.0, C)
        u = np.roll(np.linspace(-5.0, 8.0, C), 5)
        kmax = np.array([60.0, 2.0, 20.0, 6.0] * (C // 4))
    else:
        w = -np.geomspace(1e-3, 3.0, C)
        u = np.roll(np.linspace(-2.0, 3.0, C), 5)
        kmax = np.full(C, 5.0)
    k = rng.uniform(-1.0, 1.0, (B, WARMUP + T, C)) * kmax
    v = rng.standard_normal((B, WARMUP + T, C))
    _, aa, bb, pp = wkv4_ref(w, u, k[:, :WARMUP], v[:, :WARMUP])
    S = np.abs(v).max(axis=1)
    return w, u, k[:, WARMUP:], v[:, WARMUP:], (aa, bb, pp), S


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _y_err(y, y_ref, S):
    return float(np.max(np.abs(np.asarray(y, np.float64) - y_ref) / S[:, None, :]))


def _state_errs(state, ref, S):
    """(a/b error over S, log b error over max(1, |log b|)) of a state vs a reference state."""
    aa, bb, pp = (np.asarray(x, np.float64) for x in state)
    raa, rbb, rpp = (np.asarray(x, np.float64) for x in ref)
    ratio = np.max(np.abs(aa / bb - raa / rbb) / S)
    logb, rlogb = pp + np.log(bb), rpp + np.log(rbb)
    return float(ratio), float(np.max(np.abs(logb - rlogb) / np.maximum(1.0, np.abs(rlogb))))


def _assert_finite(*xs):
    for x in jax.tree_util.tree_leaves(xs):
        assert np.isfinite(np.asarray(x, np.float64)).all()


def _assert_state_close(state, ref, S, tol):
    ratio, logb = _state_errs(state, ref, S)
    assert ratio <= tol and logb <= tol, f"state: a/b err {ratio:.2e}, log b err {logb:.2e}"


# ----------------------------------------------------------------------------- 1. values

@pytest.mark.parametrize("T", [1, 7, 64, 129, 1000])
@pytest.mark.parametrize("form", MATRIX)
def test_forms_match_fp64_reference(form, T):
    w, u, k, v, st, S = _case(T)
    y_ref, *ref = wkv4_ref(w, u, k, v, *st)
    y, state = JIT[form](*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
    assert y.dtype == jnp.float32 and y.shape == (B, T, C)
    assert isinstance(state, Wkv4State)
    assert all(s.dtype == jnp.float32 and s.shape == (B, C) for s in state)
    _assert_finite(y, state)
    err = _y_err(y, y_ref, S)
    assert err <= TOL_FP32, f"{form} T={T}: output err {err:.2e}"
    _assert_state_close(state, ref, S, TOL_FP32)


@pytest.mark.parametrize("impl", ["scan", "associative", "auto"])
def test_dispatch_is_the_form(impl):
    """``wkv4(impl=...)`` returns exactly what the form it resolves to returns (same bits)."""
    w, u, k, v, st, _ = _case(7)
    args = (*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
    form = resolve_impl(impl, "wkv4", SUPPORTED).value
    got, want = JIT[f"wkv4[{impl}]"](*args), JIT[form](*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("form", MATRIX)
def test_empty_state(form):
    """``state=None`` is the official empty state (pp = -1e38): finite, equals the reference."""
    w, u, k, v, _, S = _case(64)
    y_ref, *ref = wkv4_ref(w, u, k, v)
    y, state = JIT[form](*_f32(w, u, k, v))
    _assert_finite(y, state)
    assert _y_err(y, y_ref, S) <= TOL_FP32
    _assert_state_close(state, ref, S, TOL_FP32)


# ----------------------------------------------------------------------------- 2. splitting

@pytest.mark.parametrize("form", MATRIX)
def test_prefix_then_continued_state_equals_whole(form):
    T = 71  # cut at 7 and at 64: the pieces reuse shapes compiled for the value matrix
    w, u, k, v, st, S = _case(T)
    w, u, k, v = _f32(w, u, k, v)
    st = Wkv4State(*_f32(*st))
    f = JIT[form]
    y_all, s_all = f(w, u, k, v, st)
    for cut in (7, 64):
        y1, s1 = f(w, u, k[:, :cut], v[:, :cut], st)
        y2, s2 = f(w, u, k[:, cut:], v[:, cut:], s1)
        y = jnp.concatenate([y1, y2], axis=1)
        assert _y_err(y, np.asarray(y_all, np.float64), S) <= TOL_SPLIT, f"cut {cut}"
        _assert_state_close(s2, s_all, S, TOL_SPLIT)


def test_token_by_token_step_equals_whole():
    T = 129
    w, u, k, v, st, S = _case(T)
    y_ref, *ref = wkv4_ref(w, u, k, v, *st)
    w, u, k, v = _f32(w, u, k, v)
    state = Wkv4State(*_f32(*st))
    step = jax.jit(wkv4_step)
    ys = []
    for t in range(T):
        y_t, state = step(w, u, k[:, t], v[:, t], state)
        assert y_t.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in state)
        ys.append(y_t)
    y = jnp.stack(ys, axis=1)
    for form, tol in (("scan", TOL_SAME), ("associative", TOL_SPLIT)):
        y_all, s_all = JIT[form](w, u, k, v, Wkv4State(*_f32(*st)))
        assert _y_err(y, np.asarray(y_all, np.float64), S) <= tol, form
        _assert_state_close(state, s_all, S, tol)
    assert _y_err(y, y_ref, S) <= TOL_FP32
    _assert_state_close(state, ref, S, TOL_FP32)


# ----------------------------------------------------------------------------- 3. gradients

def _closed_form(w, u, k, v, aa0, bb0, pp0):
    """RWKV-4 WKV written out directly (reference §2.1), float64, differentiable.

    With a0 = aa0·e^pp0, b0 = bb0·e^pp0 the state before token 0:
        wkv_t = (e^{t·w} a0 + Σ_{i<t} e^{(t-1-i)·w + k_i} v_i + e^{u+k_t} v_t)
              / (e^{t·w} b0 + Σ_{i<t} e^{(t-1-i)·w + k_i}     + e^{u+k_t})
    evaluated as a weighted average with log-weights shifted by their max (the shift is a
    stop_gradient constant: the ratio does not depend on it). Row t = T without the bonus
    is the final state, returned through the invariants ``a/b`` and ``log b``.
    Returns ``(y [B, T, C], a/b [B, C], log b [B, C])``.
    """
    T = k.shape[1]
    t = jnp.arange(T + 1, dtype=jnp.float64)[:, None]                # rows 0..T
    i = jnp.arange(T, dtype=jnp.float64)[None, :]
    lag = (t - 1 - i)[None, :, :, None]                                # [1, T+1, T, 1]
    L_past = jnp.where(lag >= 0, k[:, None] + lag * w[None, None, None], -jnp.inf)
    L_init = pp0[:, None] + t[None] * w[None, None]                    # [B, T+1, C]
    L_bonus = u[None, None] + k                                        # [B, T, C]
    m = jnp.maximum(jnp.max(L_past, axis=2), L_init)
    m = m.at[:, :T].max(L_bonus)
    m = jax.lax.stop_gradient(m)
    E = jnp.exp(L_past - m[:, :, None])
    e_init = jnp.exp(L_init - m)
    num = jnp.sum(E * v[:, None], axis=2) + aa0[:, None] * e_init
    den = jnp.sum(E, axis=2) + bb0[:, None] * e_init
    e_bonus = jnp.exp(L_bonus - m[:, :T])
    y = (num[:, :T] + e_bonus * v) / (den[:, :T] + e_bonus)
    return y, num[:, T] / den[:, T], m[:, T] + jnp.log(den[:, T])


_CLOSED = jax.jit(_closed_form, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("kind", ["moderate", "extreme"])
@pytest.mark.parametrize("T", [1, 7, 64, 129])
def test_closed_form_matches_numpy_reference(T, kind):
    w, u, k, v, st, S = _case(T, kind)
    y_ref, aa, bb, pp = wkv4_ref(w, u, k, v, *st)
    y, ratio, logb = _CLOSED(*(jnp.asarray(x, jnp.float64) for x in (w, u, k, v, *st)))
    assert y.dtype == jnp.float64
    assert _y_err(y, y_ref, S) <= TOL_CLOSED
    assert np.max(np.abs(ratio - aa / bb) / S) <= TOL_CLOSED
    logb_ref = pp + np.log(bb)
    assert np.max(np.abs(logb - logb_ref) / np.maximum(1.0, np.abs(logb_ref))) <= TOL_CLOSED


def _cotangents(T, kind):
    rng = np.random.default_rng([T, 7, kind == "extreme"])
    return (rng.standard_normal((B, T, C)), rng.standard_normal((B, C)),
            rng.standard_normal((B, C)))


@functools.lru_cache(maxsize=None)
def _ref_grads(T, kind, with_state=True):
    """fp64 gradients of <g, y> + <g_r, a/b> + <g_l, log b> through the closed form."""
    w, u, k, v, st, _ = _case(T, kind)
    if not with_state:
        st = (np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -1e38))
    args = tuple(jnp.asarray(x, jnp.float64) for x in (w, u, k, v, *st, *_cotangents(T, kind)))
    return tuple(np.asarray(x) for x in _CLOSED_GRAD(*args))


def _closed_functional(w, u, k, v, aa, bb, pp, g, g_r, g_l):
    y, ratio, logb = _closed_form(w, u, k, v, aa, bb, pp)
    return jnp.sum(y * g) + jnp.sum(ratio * g_r) + jnp.sum(logb * g_l)


_CLOSED_GRAD = jax.jit(jax.grad(_closed_functional, argnums=tuple(range(7))),
                       compiler_options=FAST_COMPILE)


def _functional(form):
    """<g, y> + <g_r, a/b> + <g_l, log b> through a library form, summed in float64."""
    f = FORMS[form]

    def F(w, u, k, v, aa, bb, pp, g, g_r, g_l):
        y, (aa, bb, pp) = f(w, u, k, v, Wkv4State(aa, bb, pp))
        y, aa, bb, pp = (x.astype(jnp.float64) for x in (y, aa, bb, pp))
        return jnp.sum(y * g) + jnp.sum(aa / bb * g_r) + jnp.sum((pp + jnp.log(bb)) * g_l)

    return jax.grad(F, argnums=tuple(range(7)))


LIB_GRAD = {form: jax.jit(_functional(form), compiler_options=FAST_COMPILE) for form in MATRIX}


def _lib_grads(form, T, kind, with_state=True):
    """fp32 gradients w.r.t. (w, u, k, v, aa, bb, pp) through a library form."""
    w, u, k, v, st, _ = _case(T, kind)
    if not with_state:  # the empty state, passed explicitly (same compiled function)
        st = tuple(np.asarray(x) for x in Wkv4State.zeros(B, C))
    args = (*_f32(w, u, k, v, *st), *_cotangents(T, kind))
    return tuple(np.asarray(x, np.float64) for x in LIB_GRAD[form](*args))


def _grad_err(g, g_ref, size=None):
    """Per-channel relative error, floored at 1% of the array's largest reference entry.

    ``size`` (default ``|g_ref|``): the magnitude the error is judged against, per entry."""
    assert g.shape == g_ref.shape
    n = g_ref.shape[-1]
    size = np.abs(g_ref) if size is None else size
    scale = size.reshape(-1, n).max(axis=0)
    scale = np.maximum(scale, max(1e-2 * scale.max(), 1e-300))
    return float(np.max(np.abs(g - g_ref).reshape(-1, n).max(axis=0) / scale))


GRAD_NAMES = ("w", "u", "k", "v", "aa", "bb", "pp")


@pytest.mark.parametrize("kind", ["moderate", "extreme"])
@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("form", ["scan", "associative"])
def test_gradients_match_fp64_closed_form(form, T, kind):
    got, ref = _lib_grads(form, T, kind), _ref_grads(T, kind)
    _assert_finite(got)
    errs = {n: _grad_err(a, b) for n, a, b in zip(GRAD_NAMES, got, ref)}
    assert max(errs.values()) <= TOL_GRAD, {n: f"{e:.1e}" for n, e in errs.items()}


@pytest.mark.parametrize("form", ["scan", "associative"])
def test_gradients_from_empty_state(form):
    """Backward through pp = -1e38 stays finite and exact (w, u, k, v)."""
    got, ref = _lib_grads(form, 64, "extreme", with_state=False), _ref_grads(64, "extreme", False)
    _assert_finite(got)
    for n, a, b in zip(GRAD_NAMES[:4], got, ref):
        assert _grad_err(a, b) <= TOL_GRAD, n


# ----------------------------------------------------------------------------- 4. bf16

# Only the final cast to bf16 rounds (accumulation is fp32): half a bf16 ulp is 2^-9 of |y|,
# and |y| <= S. Against the fp64 reference on the unrounded inputs, rounding k to bf16 moves
# the weights e^k by up to |k|·2^-9 (~1% at |k| = 5), hence the looser moderate-input bound.
TOL_BF16_CAST = 2.0 ** -8
TOL_BF16_REF = 2e-2


@pytest.mark.parametrize("T", [7, 129])
@pytest.mark.parametrize("form", MATRIX)
def test_bf16_inputs(form, T):
    w, u, k, v, st, S = _case(T)
    k16, v16 = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    state = Wkv4State(*_f32(*st))
    y, s = JIT[form](*_f32(w, u), k16, v16, state)
    assert y.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in s)
    _assert_finite(y, s)
    # the fp32 result on the same (bf16-valued) inputs
    y32, s32 = JIT[form](*_f32(w, u), k16.astype(jnp.float32), v16.astype(jnp.float32), state)
    assert _y_err(y, np.asarray(y32, np.float64), S) <= TOL_BF16_CAST
    _assert_state_close(s, s32, S, TOL_SAME)
    # moderate inputs: close to the fp64 reference on the unrounded inputs
    w, u, k, v, st, S = _case(T, "moderate")
    y_ref, *ref = wkv4_ref(w, u, k, v, *st)
    y, s = JIT[form](*_f32(w, u), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                     Wkv4State(*_f32(*st)))
    assert _y_err(y, y_ref, S) <= TOL_BF16_REF
    _assert_state_close(s, ref, S, TOL_BF16_REF)


# ----------------------------------------------------------------------------- 5. the enum

def test_unknown_impl_raises_naming_valid_ones():
    w, u, k, v, st, _ = _case(7)
    with pytest.raises(ValueError, match="unknown WKV implementation") as e:
        wkv4(*_f32(w, u, k, v), impl="bogus")
    for name in ("auto", "scan", "associative"):
        assert name in str(e.value)
    with pytest.raises(ValueError):
        resolve_impl("fast", "wkv4", SUPPORTED)


@pytest.mark.parametrize("impl", [WkvImpl.CHUNKED, "chunked"])
def test_unsupported_impl_raises(impl):
    w, u, k, v, _, _ = _case(7)
    with pytest.raises(ValueError, match="wkv4 has no") as e:
        wkv4(*_f32(w, u, k, v), impl=impl)
    for name in ("scan", "associative", "pallas"):
        assert name in str(e.value)


def test_auto_resolution_by_platform():
    assert resolve_impl("auto", "wkv4", SUPPORTED, platform="cpu") is WkvImpl.SCAN
    assert resolve_impl(WkvImpl.AUTO, "wkv4", SUPPORTED, platform="gpu") is WkvImpl.ASSOCIATIVE
    assert resolve_impl("auto", "wkv4", SUPPORTED, platform="tpu") is WkvImpl.ASSOCIATIVE
    assert resolve_impl("SCAN", "wkv4", SUPPORTED) is WkvImpl.SCAN  # case-insensitive
    # the Pallas form is never chosen by AUTO (it has not been measured on a GPU)
    for platform in ("cpu", "gpu", "tpu", "other"):
        assert resolve_impl("auto", "wkv4", SUPPORTED, platform=platform) is not WkvImpl.PALLAS
    if jax.default_backend() == "cpu":
        w, u, k, v, st, _ = _case(64)
        args = (*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
        y_auto, _ = JIT["wkv4[auto]"](*args)
        y_scan, _ = JIT["scan"](*args)
        np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_scan))


# ----------------------------------------------------------------------------- 6. jit

@pytest.mark.parametrize("form", MATRIX)
def test_jit_matches_eager(form):
    w, u, k, v, st, S = _case(7)  # eager runs op by op: keep T small
    args = (*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
    y_eager, s_eager = FORMS[form](*args)
    assert y_eager.dtype == jnp.float32
    for jitted in (JIT[form], jax.jit(FORMS[form])):  # fast-compile and default options
        y_jit, s_jit = jitted(*args)
        assert _y_err(y_eager, np.asarray(y_jit, np.float64), S) <= TOL_SAME
        _assert_state_close(s_eager, s_jit, S, TOL_SAME)



def test_step_jit_matches_eager():
    w, u, k, v, st, S = _case(1)
    args = (*_f32(w, u), *_f32(k[:, 0], v[:, 0]), Wkv4State(*_f32(*st)))
    y_jit, s_jit = jax.jit(wkv4_step)(*args)
    y_eager, s_eager = wkv4_step(*args)
    assert float(np.max(np.abs(np.asarray(y_jit) - np.asarray(y_eager)) / S)) <= TOL_SAME
    _assert_state_close(s_eager, s_jit, S, TOL_SAME)


# ----------------------------------------------------------------------------- 7. resets

def _closed_form_resets(w, u, k, v, aa0, bb0, pp0, resets):
    """:func:`_closed_form` for packed documents, written directly: token i enters row t
    (t = T: the final state) only from t's own document (no reset in (i, t]), the initial
    state only before the first reset. ``seg`` numbers the documents of a row."""
    T = k.shape[1]
    seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)                 # [B, T]
    seg_row = jnp.concatenate([seg, seg[:, -1:]], axis=1)              # rows 0..T
    same = (seg_row[:, :, None] == seg[:, None, :])[..., None]         # [B, T+1, T, 1]
    t = jnp.arange(T + 1, dtype=jnp.float64)[:, None]
    i = jnp.arange(T, dtype=jnp.float64)[None, :]
    lag = (t - 1 - i)[None, :, :, None]
    L_past = jnp.where((lag >= 0) & same, k[:, None] + lag * w[None, None, None], -jnp.inf)
    L_init = jnp.where((seg_row == 0)[..., None], pp0[:, None] + t[None] * w[None, None],
                       -jnp.inf)
    L_bonus = u[None, None] + k
    m = jnp.maximum(jnp.max(L_past, axis=2), L_init)
    m = jax.lax.stop_gradient(m.at[:, :T].max(L_bonus))
    E = jnp.exp(L_past - m[:, :, None])
    e_init = jnp.exp(L_init - m)
    num = jnp.sum(E * v[:, None], axis=2) + aa0[:, None] * e_init
    den = jnp.sum(E, axis=2) + bb0[:, None] * e_init
    e_bonus = jnp.exp(L_bonus - m[:, :T])
    y = (num[:, :T] + e_bonus * v) / (den[:, :T] + e_bonus)
    return y, num[:, T] / den[:, T], m[:, T] + jnp.log(den[:, T])


def _closed_resets_functional(w, u, k, v, aa, bb, pp, g, g_r, g_l, resets):
    y, ratio, logb = _closed_form_resets(w, u, k, v, aa, bb, pp, resets)
    return jnp.sum(y * g) + jnp.sum(ratio * g_r) + jnp.sum(logb * g_l), (y, ratio, logb)


_CLOSED_RESETS = jax.jit(jax.grad(_closed_resets_functional, argnums=tuple(range(7)),
                                  has_aux=True), compiler_options=FAST_COMPILE)


@functools.cache
def _lib_resets(form):
    """jit(grad) of <g, y> + <g_r, a/b> + <g_l, log b> through a form with resets, returning
    the gradients w.r.t. (w, u, k, v, aa, bb, pp) and (y, final state): one compile per T."""
    f = FORMS[form]

    def F(w, u, k, v, aa, bb, pp, g, g_r, g_l, resets):
        y, s = f(w, u, k, v, Wkv4State(aa, bb, pp), resets=resets)
        y64, aa, bb, pp = (x.astype(jnp.float64) for x in (y, *s))
        return (jnp.sum(y64 * g) + jnp.sum(aa / bb * g_r)
                + jnp.sum((pp + jnp.log(bb)) * g_l)), (y, s)

    return jax.jit(jax.grad(F, argnums=tuple(range(7)), has_aux=True),
                   compiler_options=FAST_COMPILE)


def _by_documents(w, u, k, v, st, resets):
    """The fp64 reference run one document at a time (no resets involved)."""
    def run(b, s, e, carried):
        init = tuple(x[b:b + 1] for x in st) if carried else (None,) * 3
        y, *state = wkv4_ref(w, u, k[b:b + 1, s:e], v[b:b + 1, s:e], *init)
        return y, state
    return run_documents(resets, run)


def _check_resets(form, T, kind="extreme", grads=True):
    w, u, k, v, st, S = _case(T, kind)
    cot = _cotangents(T, kind)
    for name, resets in reset_patterns(B, T).items():
        got, (y, state) = _lib_resets(form)(*_f32(w, u, k, v, *st), *cot, resets)
        _assert_finite(got, y, state)
        y_ref, *ref = wkv4_ref(w, u, k, v, *st, resets=resets)
        assert _y_err(y, y_ref, S) <= TOL_FP32, (name, _y_err(y, y_ref, S))
        if name == "none":  # an all-False mask is resets=None (compiled by the value matrix)
            y_none, s_none = JIT[form](*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
            assert _y_err(y, np.asarray(y_none, np.float64), S) <= TOL_SAME
            _assert_state_close(state, s_none, S, TOL_SAME)
        _assert_state_close(state, ref, S, TOL_FP32)
        # independent of any reset code: each document on its own, from the empty state
        for b, (y_doc, s_doc) in enumerate(_by_documents(w, u, k, v, st, resets)):
            assert _y_err(y[b:b + 1], y_doc, S[b:b + 1]) <= TOL_FP32, (name, b)
            _assert_state_close([x[b:b + 1] for x in state], s_doc, S[b:b + 1], TOL_FP32)
        if not grads:
            continue
        args64 = (jnp.asarray(x, jnp.float64) for x in (w, u, k, v, *st, *cot))
        ref_g, (y_cf, _, _) = _CLOSED_RESETS(*args64, resets)
        assert _y_err(y_cf, y_ref, S) <= TOL_CLOSED, name  # the two fp64 references agree
        got = tuple(np.asarray(x, np.float64) for x in got)
        ref_g = tuple(np.asarray(x) for x in ref_g)
        # ∂/∂pp0 = α̃·aa0 + β̃·bb0 + (max chain): its fp32 error is that of its terms, which
        # cancel; with resets the sum itself can be far below the rest of the array
        sizes = [None] * 6 + [np.abs(ref_g[6]) + np.abs(ref_g[4] * st[0])
                              + np.abs(ref_g[5] * st[1])]
        errs = {n: _grad_err(a, b, z) for n, a, b, z in zip(GRAD_NAMES, got, ref_g, sizes)}
        assert max(errs.values()) <= TOL_GRAD, (name, {n: f"{e:.1e}" for n, e in errs.items()})
        # a reset at t = 0 discards the initial state: its gradient is exactly zero
        for g in got[4:]:
            assert not np.any(g[resets[:, 0]]), name


@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("form", ["scan", "associative"])
def test_resets_match_fp64_reference(form, T):
    """Packed documents, every reset pattern, extreme decays and a non-zero initial state:
    values, final state and gradients (inputs and initial state) against the fp64
    references with resets, and against each document run alone."""
    _check_resets(form, T)


def test_resets_moderate_inputs():
    _check_resets("scan", 64, "moderate")
    _check_resets("associative", 64, "moderate")


@pytest.mark.parametrize("impl", ["scan", "associative", "auto"])
def test_dispatch_passes_resets(impl):
    """``wkv4(impl=..., resets=...)`` traces to exactly the form's program with resets."""
    w, u, k, v, st, _ = _case(7)
    args = (*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
    resets = reset_patterns(B, 7)["short"]
    form = FORMS[resolve_impl(impl, "wkv4", SUPPORTED).value]
    got = jax.make_jaxpr(functools.partial(wkv4, impl=impl, resets=resets))(*args)
    want = jax.make_jaxpr(functools.partial(form, resets=resets))(*args)
    assert str(got) == str(want) != str(jax.make_jaxpr(form)(*args))


def _loop_ref64(w, u, k, v, aa, bb, pp, resets):
    """The official per-token step in fp64 jax.numpy (differentiable), with resets."""
    w, u = w[None], u[None]

    def body(s, x):
        k_t, v_t, r_t = x
        aa, bb, pp = (jnp.where(r_t[:, None], e, s_) for e, s_ in zip((0.0, 0.0, -1e38), s))
        q = jnp.maximum(pp, u + k_t)
        e1, e2 = jnp.exp(pp - q), jnp.exp(u + k_t - q)
        y = (e1 * aa + e2 * v_t) / (e1 * bb + e2)
        q = jnp.maximum(pp + w, k_t)
        e1, e2 = jnp.exp(pp + w - q), jnp.exp(k_t - q)
        return (e1 * aa + e2 * v_t, e1 * bb + e2, q), y

    xs = (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), jnp.swapaxes(resets, 0, 1))
    (aa, bb, pp), y = jax.lax.scan(body, (aa, bb, pp), xs)
    return jnp.swapaxes(y, 0, 1), aa, bb, pp


@pytest.mark.slow
@pytest.mark.parametrize("form", ["scan", "associative"])
def test_resets_long_sequence(form):
    """T = 1000, many documents: values and gradients against an fp64 per-token loop."""
    T = 1000
    w, u, k, v, st, S = _case(T)
    cot = _cotangents(T, "extreme")
    resets = reset_patterns(B, T, chunks=(64,))["short"] | reset_patterns(B, T, (64,))["boundary64"]

    def F(*x):
        y, aa, bb, pp = _loop_ref64(*x[:7], resets)
        return jnp.sum(y * x[7]) + jnp.sum(aa / bb * x[8]) + jnp.sum((pp + jnp.log(bb)) * x[9])

    ref_g = jax.jit(jax.grad(F, argnums=tuple(range(7))))(
        *(jnp.asarray(x, jnp.float64) for x in (w, u, k, v, *st, *cot)))
    got, (y, state) = _lib_resets(form)(*_f32(w, u, k, v, *st), *cot, resets)
    y_ref, *ref = wkv4_ref(w, u, k, v, *st, resets=resets)
    assert _y_err(y, y_ref, S) <= TOL_FP32
    _assert_state_close(state, ref, S, TOL_FP32)
    for n, a, b in zip(GRAD_NAMES, got, ref_g):
        assert _grad_err(np.asarray(a, np.float64), np.asarray(b)) <= TOL_GRAD, n


@pytest.mark.parametrize("form", ["scan", "associative"])
def test_resets_bf16_inputs(form):
    w, u, k, v, st, S = _case(129)
    resets = reset_patterns(B, 129)["short"]
    k16, v16 = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    state = Wkv4State(*_f32(*st))
    y, s = JIT[form](*_f32(w, u), k16, v16, state, resets=resets)
    assert y.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in s)
    _assert_finite(y, s)
    y_ref, *ref = wkv4_ref(w, u, np.asarray(k16, np.float64), np.asarray(v16, np.float64),
                           *st, resets=resets)
    assert _y_err(y, y_ref, S) <= TOL_BF16_CAST
    _assert_state_close(s, ref, S, TOL_FP32)


def test_step_with_resets_equals_scan():
    """Decoding token by token with ``reset_t`` is the scan with ``resets``."""
    T = 20
    w, u, k, v, st, S = _case(T)
    resets = reset_patterns(B, T)["short"]
    w, u, k, v = _f32(w, u, k, v)
    y_all, s_all = wkv4_scan(w, u, k, v, Wkv4State(*_f32(*st)), resets=resets)
    state, ys = Wkv4State(*_f32(*st)), []
    for t in range(T):
        y_t, state = wkv4_step(w, u, k[:, t], v[:, t], state, resets[:, t])
        ys.append(y_t)
    assert _y_err(jnp.stack(ys, 1), np.asarray(y_all, np.float64), S) <= TOL_SAME
    _assert_state_close(state, s_all, S, TOL_SAME)


def test_resets_bad_shape():
    w, u, k, v, _, _ = _case(7)
    with pytest.raises(ValueError, match=r"resets must be \[B, T\]"):
        wkv4_scan(*_f32(w, u, k, v), resets=np.zeros((B, 6), bool))


# ----------------------------------------------------------------------------- 9. compile once

EAGER = ["step", "scan", "associative", "wkv4[pallas]"]


@pytest.mark.parametrize("name", EAGER)
def test_eager_call_compiles_once(name):
    """The first eager call compiles, a second one with the same shapes and dtypes compiles
    nothing, with and without resets; the dispatcher reaching that form then compiles
    nothing either (it calls the same cached function). B = 3, T = 5, 6, ... per case:
    shapes no other test uses, so that the first call must compile."""
    T = 5 + EAGER.index(name)
    rng = np.random.default_rng(5)
    w, u = _f32(-np.geomspace(1e-3, 3.0, C), rng.uniform(-1.0, 1.0, C))
    k, v = _f32(*rng.uniform(-3.0, 3.0, (2, 3, T, C)))
    state = Wkv4State(*_f32(rng.standard_normal((3, C)), rng.uniform(0.5, 2.0, (3, C)),
                            rng.standard_normal((3, C))))
    resets = jnp.asarray(rng.random((3, T)) < 0.5)
    dispatch = []
    if name == "step":
        k0, v0, r0 = k[:, 0], v[:, 0], resets[:, 0]
        calls = [lambda: wkv4_step(w, u, k0, v0, state),
                 lambda: wkv4_step(w, u, k0, v0, state, r0)]
    elif name == "wkv4[pallas]":  # the Pallas form itself lives apart (kernels/)
        calls = [lambda: wkv4(w, u, k, v, state, impl="pallas")]
    else:
        calls = [lambda: FORMS[name](w, u, k, v, state),
                 lambda: FORMS[name](w, u, k, v, state, resets=resets)]
        impls = [name] + (["auto"] if resolve_impl("auto", "wkv4", SUPPORTED).value == name
                          else [])
        dispatch = [lambda impl=impl: wkv4(w, u, k, v, state, impl=impl) for impl in impls]
        dispatch += [lambda impl=impl: wkv4(w, u, k, v, state, impl=impl, resets=resets)
                     for impl in impls]
        # the same call spelled otherwise (keywords) is the same cache entry
        dispatch.append(lambda: FORMS[name](w, u, k=k, v=v, state=state, resets=resets))
    assert_compiled_once(calls, dispatch)
