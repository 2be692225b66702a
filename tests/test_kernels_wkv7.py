"""The RWKV-7 Pallas kernels against the fp64 references and the fp32 lax.scan form.

Inputs are test_wkv7.py's (model-like: w ∈ (-0.6065, 0), a = -kk, b = kk ⊙ α, a non-zero
initial state; N = 8, padded to 16 inside the kernels); the error metric is test_wkv6.py's
``rel_err`` (per (batch, head) slice, max error over max |reference|), stricter than a
global max. On a CPU the kernels run in Pallas' interpret mode (slow: shapes stay tiny); on
a GPU the same tests run the compiled Triton kernels (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from documents import by_documents, by_documents_batched, random_resets
from reference_np_wkv7 import wkv7_ref
from test_wkv6 import rel_err
from test_wkv7 import BF16_INPUT_TOL, BF16_TOL, FWD_TOL, GRAD_TOL, B, make_inputs

from rwkv_jax.kernels import common
from rwkv_jax.kernels.common import KernelUnavailableError
from rwkv_jax.kernels.wkv7 import wkv7_pallas
from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv7 import SUPPORTED, wkv7, wkv7_scan

ON_CPU = jax.default_backend() == "cpu"
FAST = {"xla_backend_optimization_level": 0} if ON_CPU else None  # same arithmetic, 2x faster
FWD = jax.jit(wkv7_pallas, static_argnames=("chunk_size", "platform", "interpret"),
              compiler_options=FAST)
NAMES = ("r", "w", "k", "v", "a", "b", "state")


def y_err(got, ref):  # y [B, T, H, N]: per (batch, head)
    return rel_err(got, ref, (0, 2))


def s_err(got, ref):  # S [B, H, N, N]
    return rel_err(got, ref, (0, 1))


GRAD_SLICES = ((0, 2),) * 6 + ((0, 1),)


def _f32(xs):
    return tuple(None if x is None else np.asarray(x, np.float32) for x in xs)


def _loss(f):
    def loss(args, cot, resets):
        y, S = f(*args, resets=resets)
        return (jnp.sum(y.astype(cot[0].dtype) * cot[0]) + jnp.sum(S.astype(cot[1].dtype) * cot[1]),
                (y, S))
    return loss


GRAD = jax.jit(jax.grad(_loss(wkv7_pallas), has_aux=True), compiler_options=FAST)
SCAN_GRAD = jax.jit(jax.grad(_loss(lambda *a, resets: wkv7_scan(*a)), has_aux=True))


def _ref64(r, w, k, v, a, b, S):
    """fp64 per-token loop of the official kernel (reference §5.1), differentiable; S is
    [value, key] (None: zeros)."""
    if S is None:
        S = jnp.zeros(r.shape[:1] + r.shape[2:] + r.shape[-1:], r.dtype)

    def step(S, x):
        r_t, w_t, k_t, v_t, a_t, b_t = x
        sa = jnp.einsum("bhij,bhj->bhi", S, a_t)
        S = (S * jnp.exp(w_t)[:, :, None, :] + sa[..., :, None] * b_t[:, :, None, :]
             + v_t[..., :, None] * k_t[:, :, None, :])
        return S, jnp.einsum("bhij,bhj->bhi", S, r_t)

    S, y = jax.lax.scan(step, S, tuple(jnp.swapaxes(x, 0, 1) for x in (r, w, k, v, a, b)))
    return jnp.swapaxes(y, 0, 1), S


def _ref_values(xs, resets=None):
    xs = [None if x is None else np.asarray(x, np.float64) for x in xs]
    if resets is None:
        return wkv7_ref(*xs)
    return by_documents(lambda seq, S: wkv7_ref(*seq, S), tuple(xs[:6]), xs[6], resets)


def _ref_grads(xs, cot, resets=None):
    def loss(xs, cot):
        if resets is None:
            y, S = _ref64(*xs)
        else:
            y, S = by_documents_batched(lambda seq, S: _ref64(*seq, S), xs[:6], xs[6], resets,
                                        jnp.zeros_like(xs[6][:1]))
        return jnp.sum(y * cot[0]) + jnp.sum(S * cot[1])
    as64 = lambda t: tuple(jnp.asarray(x, jnp.float64) for x in t)  # noqa: E731
    return jax.jit(jax.grad(loss), compiler_options=FAST)(as64(xs), as64(cot))


def _cotangents(xs, seed):
    rng = np.random.default_rng(seed + 500)
    B_, _, H_, N_ = xs[0].shape
    return (rng.standard_normal(xs[0].shape).astype(np.float32),
            rng.standard_normal((B_, H_, N_, N_)).astype(np.float32))


def _assert_grads(got, ref, tol=GRAD_TOL, what="fp64"):
    for name, g, g_ref, ax in zip(NAMES, got, ref, GRAD_SLICES):
        assert np.all(np.isfinite(np.asarray(g, np.float64))), name
        err = rel_err(g, g_ref, ax)
        assert err < tol, f"grad {name} vs {what}: {err:.2e}"


def _check(xs, T, *, scan=True, fp64_grads=True, resets=None):
    """Values vs fp64; gradients vs fp64 and the fp32 scan form; forward of the VJP equals
    the primal forward bit for bit."""
    xs = _f32(xs)
    y_ref, S_ref = _ref_values(xs, resets)
    y, S = FWD(*xs, resets=resets)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32 and y.shape == xs[0].shape
    assert y_err(y, y_ref) < FWD_TOL, y_err(y, y_ref)
    assert s_err(S, S_ref) < FWD_TOL, s_err(S, S_ref)
    cot = _cotangents(xs, T)
    g, (y2, S2) = GRAD(xs, cot, resets)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(S2), np.asarray(S))
    if fp64_grads:
        _assert_grads(g, _ref_grads(xs, cot, resets))
    if scan:
        _assert_grads(g, SCAN_GRAD(xs, cot, None)[0], what="lax.scan")
    return g


# ---------------------------------------------------------------- values and gradients
# T = 129 (several chunks, a padded tail) is marked slow: T = 7 and 64 cover both
@pytest.mark.parametrize("T", [1, 7, 64, pytest.param(129, marks=pytest.mark.slow)])
def test_matches_fp64_reference_and_scan(T):
    _check(make_inputs(T, seed=T), T)


@pytest.mark.parametrize("decay", ["strong", "weak", "extreme"])
def test_decay_extremes(decay):
    """The model's strongest decay (-0.6065) everywhere, near-1 decay (-1e-6), and -20 (far
    past the model; masked exponents would reach +320 if they leaked): exact and finite."""
    g = _check(make_inputs(64, seed=2, decay=decay), 64, fp64_grads=decay != "extreme")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def test_generic_ab_and_zero_state():
    _check(make_inputs(64, seed=3, ab="generic"), 64)
    xs = _f32(make_inputs(7, seed=4, ab="generic", state=False))
    y_ref, S_ref = wkv7_ref(*xs)
    y, S = FWD(*xs)  # state=None: zeros
    assert y_err(y, y_ref) < FWD_TOL and s_err(S, S_ref) < FWD_TOL


def test_bf16_inputs():
    """bf16 inputs: y in bf16, state fp32 and exact to fp32 level; gradients in bf16, equal
    to the fp32 kernel's on the same bf16-valued inputs up to bf16 rounding."""
    xs = make_inputs(64, seed=30)
    *seq, S0 = xs
    seq16 = [jnp.asarray(x, jnp.bfloat16) for x in seq]
    S0 = np.asarray(S0, np.float32)
    y, S = FWD(*seq16, S0)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    y_ref, S_ref = wkv7_ref(*(np.asarray(x, np.float64) for x in seq16), S0)
    assert y_err(y, y_ref) < BF16_TOL and s_err(S, S_ref) < FWD_TOL
    assert y_err(y, wkv7_ref(*xs)[0]) < BF16_INPUT_TOL
    cot = _cotangents(seq, 64)
    g, _ = GRAD((*seq16, S0), cot, None)
    g32, _ = GRAD((*(np.asarray(x, np.float32) for x in seq16), S0), cot, None)
    for name, gi in zip(NAMES[:6], g):
        assert gi.dtype == jnp.bfloat16, name
    # the cotangent of the bf16 y and the gradients are each rounded to bf16 (2^-9)
    _assert_grads(g, g32, tol=2.0**-7, what="fp32 kernel")


def test_resets_equal_documents_one_by_one():
    """A packed row equals its documents one by one (fp64 references): values, final state,
    gradients; a reset at t = 0 discards the initial state (its gradient is zero)."""
    T = 64
    resets = random_resets(B, T, seed=13)
    g = _check(make_inputs(T, seed=13), T, scan=False, resets=resets)
    assert not np.any(np.asarray(g[6][1]))  # row 1 resets at t = 0


def test_head_size_64_and_chunk_32():
    xs = _f32(make_inputs(40, n=64, seed=5))
    f = functools.partial(wkv7_pallas, chunk_size=32)
    y_ref, S_ref = wkv7_ref(*xs)
    y, S = jax.jit(f, compiler_options=FAST)(*xs)
    assert y_err(y, y_ref) < FWD_TOL and s_err(S, S_ref) < FWD_TOL
    cot = _cotangents(xs, 40)
    g, _ = jax.jit(jax.grad(_loss(f), has_aux=True), compiler_options=FAST)(xs, cot, None)
    _assert_grads(g, _ref_grads(xs, cot))


def test_prefix_then_continued_state_equals_whole():
    xs = _f32(make_inputs(71, seed=9))
    *seq, S0 = xs
    y, S = FWD(*seq, S0)
    y1, S1 = FWD(*(x[:, :7] for x in seq), S0)  # reuses the T = 7 and 64 programs
    y2, S2 = FWD(*(x[:, 7:] for x in seq), S1)
    assert y_err(np.concatenate([y1, y2], 1), y) < FWD_TOL and s_err(S2, S) < FWD_TOL


# ---------------------------------------------------------------- the TPU layout, lowerings
@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="the TPU interpreter is a CPU-side check")
def test_tpu_layout_in_the_tpu_interpreter(monkeypatch):
    """Head-major layout, three time blocks of 16 on a sequential grid axis, the state and
    its adjoint carried across blocks: values and gradients with resets."""
    monkeypatch.setattr(common, "TPU_BLOCK_T", 16)
    T = 40
    xs = _f32(make_inputs(T, seed=15))
    resets = random_resets(B, T, seed=15)
    f = functools.partial(wkv7_pallas, platform="tpu", interpret=True)
    cot = _cotangents(xs, T)
    g, (y, S) = jax.jit(jax.grad(_loss(f), has_aux=True), compiler_options=FAST)(
        xs, cot, resets)
    y_ref, S_ref = _ref_values(xs, resets)
    assert y_err(y, y_ref) < FWD_TOL and s_err(S, S_ref) < FWD_TOL
    _assert_grads(g, _ref_grads(xs, cot, resets))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower(platform):
    """Forward and backward kernels lower for CUDA (Pallas Triton) and TPU (Mosaic) from this
    machine: bf16 inputs, resets, N = 64, T = 300 (several TPU time blocks). Lowering checks
    block shapes and that every primitive has a lowering; compiling needs the device."""
    T = 300
    args = tuple(jnp.zeros((2, T, 2, 64), jnp.bfloat16) for _ in range(6)) + (
        jnp.zeros((2, 2, 64, 64), jnp.float32),)
    f = functools.partial(wkv7_pallas, resets=jnp.zeros((2, T), bool), interpret=False,
                          platform="gpu" if platform == "cuda" else "tpu")

    def loss(*a):
        y, S = f(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)

    for fn, n_kernels in ((f, 1), (jax.grad(loss, argnums=tuple(range(7))), 2)):
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
    xs = _f32(make_inputs(7, seed=16))
    got = jax.make_jaxpr(functools.partial(wkv7, impl="pallas"))(*xs)
    assert str(got) == str(jax.make_jaxpr(wkv7_pallas)(*xs))
    for platform in ("cpu", "gpu", "tpu", "other"):  # never chosen by AUTO (unmeasured)
        assert resolve_impl("auto", "wkv7", SUPPORTED, platform=platform) is not WkvImpl.PALLAS


def test_errors_name_the_form():
    xs = _f32(make_inputs(4, seed=17))
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        wkv7_pallas(*xs, chunk_size=8)
    with pytest.raises(KernelUnavailableError, match="wkv7 'pallas' form: no Pallas kernel"):
        wkv7_pallas(*xs, platform="metal")
    if ON_CPU:
        with pytest.raises(KernelUnavailableError, match="wkv7 'pallas' form"):
            wkv7_pallas(*xs, interpret=False)
    with pytest.raises(ValueError, match="must share one"):
        wkv7_pallas(xs[0][:, :2], *xs[1:])
