"""The RWKV-4 Pallas kernels against the fp64 references and the fp32 lax.scan form.

References (float64): ``reference_np.wkv4_ref``, the official stable (aa, bb, pp)
recurrence in numpy, for values; for gradients, ``jax.grad`` of ``lax.scan`` over
:func:`~rwkv_jax.ops.wkv4.wkv4_step` run in float64 (plain autodiff of the official update,
independent of the hand-written backward that both the scan form and the kernel use).

Error metrics (as test_wkv4.py explains): wkv_t is a convex combination of the values seen,
so outputs are compared as ``max |y - y_ref| / S`` per (batch, channel) with S the largest
|v| the channel has seen (the initial state's ``aa/bb`` included); the state through its
invariants ``a/b`` (against S) and ``log b = pp + log bb`` (over ``max(1, |log b|)``);
gradients per channel, relative to the channel's largest reference entry, floored at 1% of
the array's largest (channels whose gradient is all underflow, e.g. at w = -400).

The kernel does the scan form's float32 operations in the same order, forward and backward,
so against the scan form the tolerance is tight. On a CPU it runs in interpret mode; on a GPU
these tests run the compiled Triton kernels (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from documents import by_documents, random_resets
from reference_np import wkv4_ref

from rwkv_jax.kernels import wkv4 as kernel_module
from rwkv_jax.kernels.common import KernelUnavailableError
from rwkv_jax.kernels.wkv4 import PALLAS_BLOCK_C, wkv4_pallas
from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv4 import SUPPORTED, Wkv4State, wkv4, wkv4_scan, wkv4_step

B, C = 2, 16
WARMUP = 20
TOL_FP32 = 1e-5    # values and state vs fp64
TOL_GRAD = 1e-4    # gradients vs fp64 (test_wkv4.py's bound for every fp32 form)
TOL_SAME = 1e-6    # values vs the scan form: the same float32 operations
TOL_SAME_GRAD = 1e-5  # gradients vs the scan form (w's sums over T cancel: ulps of exp grow)
ON_CPU = jax.default_backend() == "cpu"
FAST = {"xla_backend_optimization_level": 0} if ON_CPU else None  # same arithmetic, faster
FWD = jax.jit(wkv4_pallas, static_argnames=("platform", "interpret", "block_c"),
              compiler_options=FAST)
NAMES = ("w", "u", "k", "v", "aa", "bb", "pp")


def make_inputs(T, kind="extreme", seed=0, b=B, c=C):
    """float64 ``(w, u, k, v, (aa, bb, pp), S)``; the state from a random warm-up.

    extreme: e^w from 0.99999 down to e^-400 across channels, |k| up to 60, u in [-5, 8];
    moderate: e^w in [0.05, 0.999], |k| <= 5, u in [-2, 3].
    """
    rng = np.random.default_rng([T, seed, kind == "extreme"])
    if kind == "extreme":
        w = -np.geomspace(-np.log(0.99999), 400.0, c)
        u = np.roll(np.linspace(-5.0, 8.0, c), 5)
        kmax = np.resize([60.0, 2.0, 20.0, 6.0], c)
    else:
        w = -np.geomspace(1e-3, 3.0, c)
        u = np.roll(np.linspace(-2.0, 3.0, c), 5)
        kmax = np.full(c, 5.0)
    k = rng.uniform(-1.0, 1.0, (b, WARMUP + T, c)) * kmax
    v = rng.standard_normal((b, WARMUP + T, c))
    _, aa, bb, pp = wkv4_ref(w, u, k[:, :WARMUP], v[:, :WARMUP])
    S = np.maximum(np.abs(v).max(axis=1), np.abs(aa / bb))
    return w, u, k[:, WARMUP:], v[:, WARMUP:], (aa, bb, pp), S


def _f32(*xs):
    return tuple(np.asarray(x, np.float32) for x in xs)


def _y_err(y, y_ref, S):
    return float(np.max(np.abs(np.asarray(y, np.float64) - y_ref) / S[:, None, :]))


def _assert_state(state, ref, S, tol):
    aa, bb, pp = (np.asarray(x, np.float64) for x in state)
    raa, rbb, rpp = (np.asarray(x, np.float64) for x in ref)
    ratio = np.max(np.abs(aa / bb - raa / rbb) / S)
    logb, rlogb = pp + np.log(bb), rpp + np.log(rbb)
    logb_err = np.max(np.abs(logb - rlogb) / np.maximum(1.0, np.abs(rlogb)))
    assert ratio <= tol and logb_err <= tol, f"state: a/b {ratio:.2e}, log b {logb_err:.2e}"


def _grad_err(g, g_ref):
    g, g_ref = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
    n = g_ref.shape[-1]
    scale = np.abs(g_ref).reshape(-1, n).max(axis=0)
    scale = np.maximum(scale, max(1e-2 * scale.max(), 1e-300))
    return float(np.max(np.abs(g - g_ref).reshape(-1, n).max(axis=0) / scale))


def _assert_grads(got, ref, tol, what):
    for name, g, r in zip(NAMES, got, ref):
        assert np.all(np.isfinite(np.asarray(g, np.float64))), name
        err = _grad_err(g, r)
        assert err <= tol, f"grad {name} vs {what}: {err:.2e}"


# ---------------------------------------------------------------- gradients' machinery
def _functional(y, s, cot):
    """<g, y> + <g_r, a/b> + <g_l, log b>: the state through its invariants (its (aa, bb,
    pp) representation is not unique), summed in cot's dtype."""
    dt = cot[0].dtype
    aa, bb, pp = (x.astype(dt) for x in s)
    return (jnp.sum(y.astype(dt) * cot[0]) + jnp.sum(aa / bb * cot[1])
            + jnp.sum((pp + jnp.log(bb)) * cot[2]))


def _loss(f):
    def loss(args, cot, resets):
        w, u, k, v, aa, bb, pp = args
        y, s = f(w, u, k, v, Wkv4State(aa, bb, pp), resets=resets)
        return _functional(y, s, cot), (y, s)
    return loss


GRAD = jax.jit(jax.grad(_loss(wkv4_pallas), has_aux=True), compiler_options=FAST)
SCAN_GRAD = jax.jit(jax.grad(_loss(lambda *a, resets: wkv4_scan(*a)), has_aux=True),
                    compiler_options=FAST)


def _scan64(w, u, k, v, state):
    """The official step over T in float64 (state None: the empty state)."""
    Bq, _, Cq = k.shape
    if state is None:
        state = Wkv4State(jnp.zeros((Bq, Cq)), jnp.zeros((Bq, Cq)), jnp.full((Bq, Cq), -1e38))

    def body(st, kv):
        y, st = wkv4_step(w, u, kv[0], kv[1], Wkv4State(*st))
        return tuple(st), y

    st, y = jax.lax.scan(body, tuple(state), (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return jnp.swapaxes(y, 0, 1), Wkv4State(*st)


def _ref_grads(args, cot, resets=None):
    def loss(args, cot):
        w, u, k, v, aa, bb, pp = args
        if resets is None:
            y, s = _scan64(w, u, k, v, Wkv4State(aa, bb, pp))
        else:
            y, s = by_documents(lambda seq, st: _scan64(w, u, *seq, st), (k, v),
                                Wkv4State(aa, bb, pp), resets)
        return _functional(y, s, cot)
    as64 = lambda t: tuple(jnp.asarray(x, jnp.float64) for x in t)  # noqa: E731
    return jax.jit(jax.grad(loss), compiler_options=FAST)(as64(args), as64(cot))


def _cotangents(k, seed):
    rng = np.random.default_rng(seed + 700)
    Bq, _, Cq = k.shape
    return (rng.standard_normal(k.shape).astype(np.float32),
            *(rng.standard_normal((Bq, Cq)).astype(np.float32) for _ in range(2)))


def _check(T, kind, seed=0, resets=None):
    w, u, k, v, st, S = make_inputs(T, kind, seed)
    args = _f32(w, u, k, v, *st)
    if resets is None:
        y_ref, *ref = wkv4_ref(w, u, k, v, *st)
    else:
        y_ref, ref = by_documents(lambda seq, s: _ref_np(w, u, seq, s), (k, v),
                                  Wkv4State(*st), resets)
    y, s = FWD(*args[:4], Wkv4State(*args[4:]), resets=resets)
    assert y.dtype == jnp.float32 and y.shape == (B, T, C)
    assert all(x.dtype == jnp.float32 and x.shape == (B, C) for x in s)
    assert _y_err(y, np.asarray(y_ref), S) <= TOL_FP32, _y_err(y, np.asarray(y_ref), S)
    _assert_state(s, ref, S, TOL_FP32)
    cot = _cotangents(k, T)
    g, (y2, _) = GRAD(args, cot, resets)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    _assert_grads(g, _ref_grads(args, cot, resets), TOL_GRAD, "fp64")
    if resets is None:
        g_scan, (y_scan, s_scan) = SCAN_GRAD(args, cot, None)
        assert _y_err(y, np.asarray(y_scan, np.float64), S) <= TOL_SAME
        _assert_state(s, s_scan, S, TOL_SAME)
        _assert_grads(g, g_scan, TOL_SAME_GRAD, "lax.scan")
    return g


def _ref_np(w, u, seq, st):
    y, aa, bb, pp = wkv4_ref(w, u, *seq, *(st if st is not None else (None,) * 3))
    return y, Wkv4State(aa, bb, pp)


# ---------------------------------------------------------------- values and gradients
# T = 129 (several chunks, a padded tail) is marked slow: T = 7 and 64 cover both
@pytest.mark.parametrize("T", [1, 7, 64, pytest.param(129, marks=pytest.mark.slow)])
def test_matches_fp64_reference_and_scan(T):
    """Extreme decays and keys, warm initial state: values, state and gradients (initial
    state included) vs fp64 and vs the fp32 scan form."""
    _check(T, "extreme")


def test_moderate_inputs():
    _check(64, "moderate")


def test_empty_state():
    """state=None is the empty state (pp = -1e38): finite and exact."""
    w, u, k, v, _, S = make_inputs(64)
    y_ref, *ref = wkv4_ref(w, u, k, v)
    y, s = FWD(*_f32(w, u, k, v))
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(x)) for x in s)
    assert _y_err(y, y_ref, S) <= TOL_FP32
    _assert_state(s, ref, S, TOL_FP32)


def test_bf16_inputs():
    """bf16 k, v: y in bf16 (only the final cast rounds), state fp32 and equal to the fp32
    run on the same bf16-valued inputs; gradients come back in bf16."""
    w, u, k, v, st, S = make_inputs(64)
    k16, v16 = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    state = Wkv4State(*_f32(*st))
    y, s = FWD(*_f32(w, u), k16, v16, state)
    assert y.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in s)
    y32, s32 = FWD(*_f32(w, u), np.asarray(k16, np.float32), np.asarray(v16, np.float32), state)
    assert _y_err(y, np.asarray(y32, np.float64), S) <= 2.0**-8
    _assert_state(s, s32, S, TOL_SAME)
    args = (*_f32(w, u), k16, v16, *state)
    g, _ = GRAD(args, _cotangents(k, 64), None)
    assert g[2].dtype == jnp.bfloat16 and g[3].dtype == jnp.bfloat16
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in g)


def test_resets_equal_documents_one_by_one():
    """A packed row equals its documents one by one (fp64 references), values, final state
    and gradients; a reset at t = 0 discards the initial state (its gradient is zero)."""
    resets = random_resets(B, 64, seed=3)
    g = _check(64, "moderate", seed=3, resets=resets)
    assert not any(np.any(np.asarray(x[1])) for x in g[4:])  # row 1 resets at t = 0


def test_channel_blocks():
    """Several channel blocks, C not a multiple of the block, B = 3: equal to the scan form
    (values, state, gradients)."""
    B3, T, C3 = 3, 33, 2 * PALLAS_BLOCK_C + 12
    w, u, k, v, st, S = make_inputs(T, seed=11, b=B3, c=C3)
    args = _f32(w, u, k, v, *st)
    cot = _cotangents(k, 11)
    g, (y, s) = GRAD(args, cot, None)
    g_scan, (y_scan, s_scan) = SCAN_GRAD(args, cot, None)
    assert y.shape == (B3, T, C3)
    assert _y_err(y, np.asarray(y_scan, np.float64), S) <= TOL_SAME
    _assert_state(s, s_scan, S, TOL_SAME)
    _assert_grads(g, g_scan, TOL_SAME_GRAD, "lax.scan")


def test_prefix_then_continued_state_equals_whole():
    w, u, k, v, st, S = make_inputs(71)
    w, u, k, v = _f32(w, u, k, v)
    st = Wkv4State(*_f32(*st))
    y, s = FWD(w, u, k, v, st)
    y1, s1 = FWD(w, u, k[:, :7], v[:, :7], st)
    y2, s2 = FWD(w, u, k[:, 7:], v[:, 7:], s1)
    assert _y_err(np.concatenate([y1, y2], 1), np.asarray(y, np.float64), S) <= TOL_SAME
    _assert_state(s2, s, S, TOL_SAME)


# ---------------------------------------------------------------- the TPU layout, lowerings
@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="the TPU interpreter is a CPU-side check")
def test_tpu_layout_in_the_tpu_interpreter(monkeypatch):
    """128-channel blocks, 16-token tiles, three time blocks of 32 on a sequential grid axis
    (T = 70: padded steps masked), state and adjoint carried across blocks, resets."""
    monkeypatch.setattr(kernel_module, "TPU_BLOCK_T", 32)
    T = 70
    w, u, k, v, st, S = make_inputs(T, "moderate", seed=5)
    resets = random_resets(B, T, seed=5)
    args = _f32(w, u, k, v, *st)
    cot = _cotangents(k, T)
    f = functools.partial(wkv4_pallas, platform="tpu", interpret=True)
    g, (y, s) = jax.jit(jax.grad(_loss(f), has_aux=True), compiler_options=FAST)(
        args, cot, resets)
    y_ref, ref = by_documents(lambda seq, s_: _ref_np(w, u, seq, s_), (k, v), Wkv4State(*st),
                              resets)
    assert _y_err(y, np.asarray(y_ref), S) <= TOL_FP32
    _assert_state(s, ref, S, TOL_FP32)
    _assert_grads(g, _ref_grads(args, cot, resets), TOL_GRAD, "fp64")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower(platform):
    """Forward and backward kernels lower for CUDA (Pallas Triton) and TPU (Mosaic) from this
    machine: bf16 keys, padded C, resets, T = 300 (several TPU time blocks, masked tail).
    jax >= 0.11 lowers Triton only with a GPU: skipped there without one."""
    B3, T, C3 = 2, 300, 136
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    args = (z(C3), z(C3), jnp.zeros((B3, T, C3), jnp.bfloat16), z((B3, T, C3)),
            Wkv4State(z((B3, C3)), z((B3, C3)), z((B3, C3))))
    f = functools.partial(wkv4_pallas, resets=jnp.zeros((B3, T), bool), interpret=False,
                          platform="gpu" if platform == "cuda" else "tpu")

    def loss(w, u, k, v, st):
        y, s = f(w, u, k, v, st)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s.aa) + jnp.sum(s.pp)

    for fn, n_kernels in ((f, 1), (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), 2)):
        try:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        except RuntimeError as e:
            if "No supported GPU" in str(e) or "TPU" in str(e):
                pytest.skip(f"this jax lowers {platform} kernels only on the device: {e}")
            raise
        marker = "tpu_custom_call" if platform == "tpu" else "triton"
        assert text.count(marker) >= n_kernels


# ---------------------------------------------------------------- dispatch and errors
def test_dispatch_routes_pallas_to_the_kernel():
    w, u, k, v, st, _ = make_inputs(7)
    args = (*_f32(w, u, k, v), Wkv4State(*_f32(*st)))
    got = jax.make_jaxpr(functools.partial(wkv4, impl=WkvImpl.PALLAS))(*args)
    assert str(got) == str(jax.make_jaxpr(wkv4_pallas)(*args))
    for platform in ("cpu", "gpu", "tpu", "other"):  # never chosen by AUTO (unmeasured)
        assert resolve_impl("auto", "wkv4", SUPPORTED, platform=platform) is not WkvImpl.PALLAS


def test_errors_name_the_form():
    w, u, k, v, _, _ = make_inputs(7)
    args = _f32(w, u, k, v)
    with pytest.raises(ValueError, match="power of two"):
        wkv4_pallas(*args, block_c=12)
    with pytest.raises(ValueError, match="multiple of 128"):
        wkv4_pallas(*args, block_c=64, platform="tpu")
    with pytest.raises(KernelUnavailableError, match="wkv4 'pallas' form: no Pallas kernel"):
        wkv4_pallas(*args, platform="metal")
    if ON_CPU:
        with pytest.raises(KernelUnavailableError, match="wkv4 'pallas' form"):
            wkv4_pallas(*args, interpret=False)
    with pytest.raises(ValueError, match="resets must be bool"):
        wkv4_pallas(*args, resets=np.zeros((B, 3), bool))
