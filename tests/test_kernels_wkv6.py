"""The RWKV-5/6 Pallas kernels against the fp64 references and the fp32 lax.scan form.

Inputs, error metric (``rel_err``: per (batch, head) slice, max error over max |reference|)
and tolerances are those of test_wkv6.py. On a CPU the kernels run in Pallas' interpret mode
(slow: shapes stay tiny); on a GPU the same tests run the compiled Triton kernels
(benchmarks/gpu_check.sh). The TPU layout runs in the TPU interpreter on CPU and is
lowered (not compiled) for TPU; the Triton kernels are lowered for CUDA where this jax can.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from documents import by_documents, by_documents_batched, random_resets
from reference_np_wkv6 import wkv6_reference
from test_wkv6 import (GRAD_NAMES, GRAD_SLICES, TOL_BF16, TOL_FP32, TOL_GRAD, B, H, N, as64,
                       closed_form_f64, make_inputs, rel_err, s_err, y_err)

from rwkv_jax.kernels import common
from rwkv_jax.kernels.common import KernelUnavailableError
from rwkv_jax.kernels.wkv6 import wkv6_pallas
from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv6 import SUPPORTED, wkv6, wkv6_scan

ON_CPU = jax.default_backend() == "cpu"
# interpret mode compiles the kernels as XLA:CPU loops: optimisation level 0 compiles in
# about half the time and emits the same arithmetic
FAST = {"xla_backend_optimization_level": 0} if ON_CPU else None
STATIC = ("chunk_size", "platform", "interpret")
FWD = jax.jit(wkv6_pallas, static_argnames=STATIC, compiler_options=FAST)


def _loss(f):
    def loss(args, cot, resets):
        y, S = f(*args, resets=resets)
        return (jnp.sum(y.astype(cot[0].dtype) * cot[0]) + jnp.sum(S.astype(cot[1].dtype) * cot[1]),
                (y, S))
    return loss


# gradient w.r.t. (r, w, k, v, u, state), with the forward's (y, S) as aux
GRAD = jax.jit(jax.grad(_loss(wkv6_pallas), has_aux=True), compiler_options=FAST)
SCAN_GRAD = jax.jit(jax.grad(_loss(lambda *a, resets: wkv6_scan(*a)), has_aux=True))


def _cotangents(args, seed):
    rng = np.random.default_rng(seed + 500)
    r, S0 = args[0], args[5]
    return (rng.standard_normal(r.shape).astype(np.float32),
            rng.standard_normal(S0.shape).astype(np.float32))


def _closed_by_documents(r, w, k, v, u, S0, resets):
    if resets is None:
        return closed_form_f64(r, w, k, v, u, S0)

    return by_documents_batched(lambda seq, S: closed_form_f64(*seq, u, S),
                                (r, jnp.broadcast_to(w, r.shape), k, v), S0, resets,
                                jnp.zeros_like(S0[:1]))


def _ref_grads(args, cot, resets=None):
    """fp64 gradients through the closed form, documents one by one (jitted: eager op-by-op
    autodiff of it takes ~10x longer than compiling it; the documents run as one batch)."""
    def loss(args, cot):
        y, S = _closed_by_documents(*args, resets)
        return jnp.sum(y * cot[0]) + jnp.sum(S * cot[1])
    as_f64 = lambda xs: tuple(jnp.asarray(x, jnp.float64) for x in xs)  # noqa: E731
    return jax.jit(jax.grad(loss), compiler_options=FAST)(as_f64(args), as_f64(cot))


def _ref_values(args, resets=None):
    r, w, k, v, u, S0 = as64(args)
    if resets is None:
        return wkv6_reference(r, w, k, v, u, S0)
    return by_documents(lambda seq, S: wkv6_reference(*seq, u, S),
                        (r, np.broadcast_to(w, r.shape), k, v), S0, resets)


def _assert_grads(got, ref, tol=TOL_GRAD, what="fp64"):
    for name, g, g_ref, ax in zip(GRAD_NAMES, got, ref, GRAD_SLICES):
        assert np.all(np.isfinite(np.asarray(g, np.float64))), name
        err = rel_err(g, g_ref, ax)
        assert err < tol, f"grad {name} vs {what}: {err:.2e}"


# ---------------------------------------------------------------- values and gradients
# T = 129 (several chunks, a padded tail) is marked slow: T = 7 and 64 cover both
@pytest.mark.parametrize("T", [1, 7, 64, pytest.param(129, marks=pytest.mark.slow)])
def test_matches_fp64_reference_and_scan(T):
    """y, final state and every gradient (initial state included) vs the fp64 references
    and vs the fp32 lax.scan form; the forward of the VJP (which also writes checkpoints)
    is the primal forward bit for bit."""
    args = make_inputs(T, seed=T)
    y_ref, S_ref = _ref_values(args)
    y, S = FWD(*args)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert y.shape == (B, T, H, N) and S.shape == (B, H, N, N)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    cot = _cotangents(args, T)
    g, (y2, S2) = GRAD(args, cot, None)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(S2), np.asarray(S))
    assert all(gi.dtype == jnp.float32 for gi in g)
    _assert_grads(g, _ref_grads(args, cot))
    g_scan, _ = SCAN_GRAD(args, cot, None)
    _assert_grads(g, g_scan, what="lax.scan")


@pytest.mark.parametrize("decay", ["spiky", "extreme"])
def test_extreme_decays(decay):
    """Weak decays right after ~-150 spikes (a cumsum difference would cancel), and -1e3 /
    -inf (clamped): exact values, finite gradients equal to the scan form's (spiky: and to
    fp64)."""
    r, w, k, v, u, S0 = make_inputs(64, seed=11, decay=decay)
    if decay == "extreme":
        w[:, 3] = -np.inf
    args = (r, w, k, v, u, S0)
    y_ref, S_ref = _ref_values(args)
    y, S = FWD(*args)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(S))
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    cot = _cotangents(args, 64)
    g, _ = GRAD(args, cot, None)
    g_scan, _ = SCAN_GRAD(args, cot, None)
    _assert_grads(g, g_scan, what="lax.scan")
    if decay == "spiky":
        _assert_grads(g, _ref_grads(args, cot))


def test_rwkv5_constant_decay():
    """RWKV-5's [H, N] decay, broadcast over (B, T) by the wrapper."""
    args = make_inputs(64, seed=12, decay="rwkv5")
    y_ref, S_ref = _ref_values(args)
    y, S = FWD(*args)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32


def test_bf16_inputs():
    """bf16 r, w, k, v: y in bf16, state fp32; gradients in the inputs' dtypes, equal to the
    fp32 kernel's on the same (bf16-valued) inputs up to their own bf16 rounding."""
    args = make_inputs(64, seed=9, dtype=jnp.bfloat16)
    y_ref, S_ref = _ref_values(args)
    y, S = FWD(*args)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert y_err(y, y_ref) < TOL_BF16 and s_err(S, S_ref) < TOL_FP32
    cot = _cotangents(args, 64)
    g, _ = GRAD(args, cot, None)
    g32, _ = GRAD(tuple(np.asarray(x, np.float32) for x in args), cot, None)
    for name, gi, x in zip(GRAD_NAMES, g, args):
        assert gi.dtype == x.dtype, name
    # both the cotangent of the bf16 y and the gradients are rounded to bf16 (2^-9 each)
    _assert_grads(g, g32, tol=2.0**-7, what="fp32 kernel")


def test_resets_equal_documents_one_by_one():
    """A packed row equals its documents run one by one (fp64 references), in values, final
    state and gradients; a reset at t = 0 discards the initial state (zero gradient)."""
    T = 64
    args = make_inputs(T, seed=13)
    resets = random_resets(B, T, seed=13)
    y_ref, S_ref = _ref_values(args, resets)
    y, S = FWD(*args, resets=resets)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    cot = _cotangents(args, T)
    g, (y2, _) = GRAD(args, cot, resets)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    _assert_grads(g, _ref_grads(args, cot, resets))
    assert not np.any(np.asarray(g[5][1]))  # row 1 resets at t = 0


def test_padded_head_size_and_other_chunk():
    """N = 24 (padded to 32 inside), chunk 32, T = 37 (padded to 64)."""
    rng = np.random.default_rng(14)
    Bq, T, Hq, Nq = 1, 37, 2, 24
    r, k, v = (rng.standard_normal((Bq, T, Hq, Nq)).astype(np.float32) for _ in range(3))
    w = -np.exp(rng.uniform(-8.0, 3.0, (Bq, T, Hq, Nq))).astype(np.float32)
    u = rng.uniform(-1, 1, (Hq, Nq)).astype(np.float32)
    S0 = rng.standard_normal((Bq, Hq, Nq, Nq)).astype(np.float32)
    y_ref, S_ref = wkv6_reference(*as64((r, w, k, v, u, S0)))
    f = functools.partial(wkv6_pallas, chunk_size=32)
    y, S = jax.jit(f, compiler_options=FAST)(r, w, k, v, u, S0)
    assert y.shape == (Bq, T, Hq, Nq) and S.shape == (Bq, Hq, Nq, Nq)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    args = (r, w, k, v, u, S0)
    cot = (rng.standard_normal(r.shape), rng.standard_normal(S0.shape))
    g, _ = jax.jit(jax.grad(_loss(f), has_aux=True), compiler_options=FAST)(args, cot, None)
    _assert_grads(g, _ref_grads(args, cot))


def test_prefix_then_continued_state_equals_whole():
    r, w, k, v, u, S0 = make_inputs(71, seed=5)
    y, S = FWD(r, w, k, v, u, S0)
    cut = 7  # the pieces reuse the T = 7 and T = 64 programs
    y1, S1 = FWD(r[:, :cut], w[:, :cut], k[:, :cut], v[:, :cut], u, S0)
    y2, S2 = FWD(r[:, cut:], w[:, cut:], k[:, cut:], v[:, cut:], u, S1)
    assert y_err(np.concatenate([y1, y2], axis=1), y) < TOL_FP32
    assert s_err(S2, S) < TOL_FP32


# ---------------------------------------------------------------- the TPU layout, lowerings
@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="the TPU interpreter is a CPU-side check")
def test_tpu_layout_in_the_tpu_interpreter(monkeypatch):
    """Head-major layout, time in blocks on a sequential grid axis (three blocks of 16 here),
    the state and its adjoint carried across blocks: values and gradients with resets."""
    monkeypatch.setattr(common, "TPU_BLOCK_T", 16)
    T = 40
    args = make_inputs(T, seed=15)
    resets = random_resets(B, T, seed=15)
    f = functools.partial(wkv6_pallas, platform="tpu", interpret=True)
    cot = _cotangents(args, T)
    g, (y, S) = jax.jit(jax.grad(_loss(f), has_aux=True), compiler_options=FAST)(
        args, cot, resets)
    y_ref, S_ref = _ref_values(args, resets)
    assert y_err(y, y_ref) < TOL_FP32 and s_err(S, S_ref) < TOL_FP32
    _assert_grads(g, _ref_grads(args, cot, resets))


def _lowering_args():
    T, Hq, Nq = 300, 2, 64
    bf = functools.partial(jnp.zeros, dtype=jnp.bfloat16)
    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    return (bf((2, T, Hq, Nq)), f32((2, T, Hq, Nq)), bf((2, T, Hq, Nq)), bf((2, T, Hq, Nq)),
            f32((Hq, Nq)), f32((2, Hq, Nq, Nq)), jnp.zeros((2, T), bool))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower(platform):
    """Forward and backward kernels lower for CUDA (Pallas Triton) and TPU (Mosaic) from this
    machine: bf16 inputs, resets, N = 64, T = 300 (several TPU time blocks). Lowering checks
    the block shapes and that every primitive has a lowering; compiling needs the device."""
    *args, resets = _lowering_args()
    f = functools.partial(wkv6_pallas, resets=resets, interpret=False,
                          platform="gpu" if platform == "cuda" else "tpu")

    def loss(*a):
        y, S = f(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)

    for fn, n_kernels in ((f, 1), (jax.grad(loss, argnums=tuple(range(6))), 2)):
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
    args = make_inputs(7, seed=16)
    got = jax.make_jaxpr(functools.partial(wkv6, impl=WkvImpl.PALLAS))(*args)
    assert str(got) == str(jax.make_jaxpr(wkv6_pallas)(*args))
    for platform in ("cpu", "gpu", "tpu", "other"):  # never chosen by AUTO (unmeasured)
        assert resolve_impl("auto", "wkv6", SUPPORTED, platform=platform) is not WkvImpl.PALLAS


def test_errors_name_the_form():
    args = make_inputs(4, seed=17)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        wkv6_pallas(*args, chunk_size=24)
    with pytest.raises(KernelUnavailableError, match="wkv6 'pallas' form: no Pallas kernel"):
        wkv6_pallas(*args, platform="metal")
    if ON_CPU:
        with pytest.raises(KernelUnavailableError, match="wkv6 'pallas' form"):
            wkv6_pallas(*args, interpret=False)
    with pytest.raises(ValueError, match="resets must be bool"):
        wkv6_pallas(*args, resets=np.zeros((B, 5), bool))
    with pytest.raises(ValueError, match="u must be"):
        wkv6_pallas(*args[:4], args[4][:, :3], args[5])
