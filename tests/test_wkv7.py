"""RWKV-7 WKV forms vs each other and vs an fp64 transcription of the official kernel.

Error metric throughout: ``rel(x, ref) = max|x - ref| / max|ref|`` (max-norm relative to the
largest reference entry), per output (``y`` and the final state separately). Inputs are
model-like unless a test says otherwise: ``w ∈ (-0.6065, 0)``, ``a = -kk``, ``b = kk ⊙ α`` with
``kk`` unit-norm per head and ``α ∈ (0, 1)``, a non-zero initial state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_count import assert_compiled_once
from reference_np import reset_patterns, run_documents
from reference_np_wkv7 import wkv7_ref
from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv7 import (state_from_fla, state_to_fla, wkv7, wkv7_chunked, wkv7_scan,
                               wkv7_step)

W_MIN = -np.exp(-0.5)  # strongest log decay the model can produce: -0.6065…

B, H, N = 2, 2, 8
# Tolerances (metric ``rel`` above); observed worst cases on CPU in brackets.
FWD_TOL = 1e-5    # fp32 forms vs fp64 reference, y and state [4.5e-7, T=1000 and weak decay]
GRAD_TOL = 1e-5   # fp32 gradients vs fp64 reference gradients, each input [2.8e-7]
BF16_TOL = 5e-3   # bf16 y vs fp64 on the same bf16-rounded inputs [1.5e-3]: y's own rounding
BF16_INPUT_TOL = 2e-2  # bf16 y vs fp64 on the unrounded inputs [4.2e-3]: + input rounding


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def make_inputs(T, *, n=N, seed=0, decay="random", ab="delta", state=True):
    """float64 numpy inputs ``(r, w, k, v, a, b, S0)``; see the module docstring."""
    rng = np.random.default_rng(seed)
    shape = (B, T, H, n)
    r = rng.normal(size=shape)
    k = rng.normal(size=shape) / np.sqrt(n)
    v = rng.normal(size=shape)
    w = {"random": W_MIN / (1 + np.exp(-2 * rng.normal(size=shape))),
         "strong": np.full(shape, W_MIN),
         "weak": np.full(shape, -1e-6),
         "extreme": np.full(shape, -20.0)}[decay]
    if ab == "delta":
        kk = rng.normal(size=shape)
        kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
        a, b = -kk, kk * rng.uniform(0.05, 0.95, size=shape)
    else:  # generic small-norm a, b (|a|, |b| ≈ 0.3)
        a = 0.3 * rng.normal(size=shape) / np.sqrt(n)
        b = 0.3 * rng.normal(size=shape) / np.sqrt(n)
    S0 = 0.3 * rng.normal(size=(B, H, n, n)) if state else None
    return r, w, k, v, a, b, S0


def f32(xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


FORMS = {
    "scan": jax.jit(wkv7_scan),
    "chunked": jax.jit(wkv7_chunked),
    "chunked5": jax.jit(functools.partial(wkv7_chunked, chunk_size=5)),  # T % 5 != 0 often
    "chunked64": jax.jit(functools.partial(wkv7_chunked, chunk_size=64)),
    "dispatch": jax.jit(wkv7),
}


def check_fwd(fn, xs, tol=FWD_TOL):
    y_ref, S_ref = wkv7_ref(*xs)
    y, S = fn(*f32(xs))
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert S.shape == (B, H, xs[0].shape[-1], xs[0].shape[-1])
    assert rel(y, y_ref) < tol, rel(y, y_ref)
    assert rel(S, S_ref) < tol, rel(S, S_ref)


@functools.cache
def _grad_of_sum(form):
    """jitted gradient of ``sum(y) + sum(final_state)`` w.r.t. all seven inputs."""
    def loss(*x):
        y, S = FORMS[form](*x)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)
    return jax.jit(jax.grad(loss, argnums=tuple(range(7))))


# --- 1. forward vs the fp64 reference ------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 16, 64, 129])
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_match_reference(form, T):
    check_fwd(FORMS[form], make_inputs(T, seed=T))


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_long_sequence(form):
    check_fwd(FORMS[form], make_inputs(1000, seed=1))


@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("form", ["scan", "chunked", "chunked64"])
def test_decay_extremes(form, decay):
    check_fwd(FORMS[form], make_inputs(129, seed=2, decay=decay))


@pytest.mark.parametrize("form", ["scan", "chunked", "chunked5"])
def test_generic_ab_and_zero_state(form):
    check_fwd(FORMS[form], make_inputs(64, seed=3, ab="generic"))
    check_fwd(FORMS[form], make_inputs(37, seed=4, ab="generic", state=False))


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_head_size_64(form):
    check_fwd(FORMS[form], make_inputs(129, n=64, seed=5))


def test_step_matches_reference():
    xs = make_inputs(16, seed=6)
    y_ref, S_ref = wkv7_ref(*xs)
    step = jax.jit(wkv7_step)
    r, w, k, v, a, b, S = f32(xs)
    ys = []
    for t in range(16):
        y_t, S = step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], S)
        ys.append(y_t)
    assert rel(jnp.stack(ys, 1), y_ref) < FWD_TOL and rel(S, S_ref) < FWD_TOL


def test_not_jitted():
    xs = make_inputs(7, seed=7)
    check_fwd(wkv7_scan, xs)
    check_fwd(functools.partial(wkv7_chunked, chunk_size=4), xs)


def test_extreme_decay_is_finite_and_exact():
    """w = -20 (far past the model's -0.6065): masked exponents reach +320 and must not leak."""
    check_fwd(FORMS["chunked"], make_inputs(40, seed=8, decay="extreme"))
    xs = f32(make_inputs(40, seed=8, decay="extreme"))
    g = _grad_of_sum("chunked")(*xs)
    assert all(bool(jnp.all(jnp.isfinite(gi))) for gi in g)


# --- 2. state carrying ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["scan", "chunked", "chunked5"])
def test_prefix_then_continue_equals_whole(form):
    fn = FORMS[form]
    xs = f32(make_inputs(129, seed=9))
    *seq, S0 = xs
    y, S = fn(*seq, S0)
    y1, S1 = fn(*(x[:, :50] for x in seq), S0)
    y2, S2 = fn(*(x[:, 50:] for x in seq), S1)
    assert rel(jnp.concatenate([y1, y2], 1), y) < FWD_TOL
    assert rel(S2, S) < FWD_TOL


def test_token_by_token_equals_whole():
    xs = f32(make_inputs(20, seed=10))
    *seq, S = xs
    y, S_whole = FORMS["chunked"](*seq, S)
    ys = []
    for t in range(20):  # decoding is the same op with T = 1
        y_t, S = FORMS["dispatch"](*(x[:, t:t + 1] for x in seq), S)
        ys.append(y_t)
    assert rel(jnp.concatenate(ys, 1), y) < FWD_TOL and rel(S, S_whole) < FWD_TOL


def test_fla_layout():
    S = jnp.arange(2 * 3 * 4 * 4, dtype=jnp.float32).reshape(2, 3, 4, 4)
    Z = state_to_fla(S)
    assert Z[1, 2, 3, 0] == S[1, 2, 0, 3]  # [key, value] vs [value, key]
    assert bool(jnp.all(state_from_fla(Z) == S))
    # a state exported to FLA's layout reads y = rᵀ Z, i.e. S r
    r = jnp.ones((2, 3, 4), jnp.float32)
    np.testing.assert_allclose(jnp.einsum("bhkv,bhk->bhv", Z, r),
                               jnp.einsum("bhvk,bhk->bhv", S, r))


# --- 3. gradients vs an independent fp64 jax loop ----------------------------------------------


def _ref64(r, w, k, v, a, b, S0, resets=None):
    """Independent fp64 per-token loop in the transposed [key, value] layout Z = Sᵀ; with
    ``resets`` [B, T], Z is zeroed before each token that starts a document."""
    if resets is None:
        resets = jnp.zeros(r.shape[:2], jnp.bool_)

    def body(Z, x):
        r_t, w_t, k_t, v_t, a_t, b_t, z_t = x
        Z = jnp.where(z_t[:, None, None, None], 0.0, Z)
        sa = jnp.einsum("bhk,bhkv->bhv", a_t, Z)
        Z = (jnp.exp(w_t)[..., None] * Z + b_t[..., :, None] * sa[..., None, :]
             + k_t[..., :, None] * v_t[..., None, :])
        return Z, jnp.einsum("bhk,bhkv->bhv", r_t, Z)

    Z, y = jax.lax.scan(body, jnp.swapaxes(S0, -1, -2),
                        tuple(jnp.swapaxes(x, 0, 1) for x in (r, w, k, v, a, b, resets)))
    return jnp.swapaxes(y, 0, 1), jnp.swapaxes(Z, -1, -2)


def _ref64_loss(r, w, k, v, a, b, S0, cy, cS, resets=None):
    y, S = _ref64(r, w, k, v, a, b, S0, resets)
    return jnp.sum(y * cy) + jnp.sum(S * cS)


_ref64_grad = jax.jit(jax.grad(_ref64_loss, argnums=tuple(range(7))))


def _lib_loss(fn):
    def loss(r, w, k, v, a, b, S0, cy, cS):
        y, S = fn(r, w, k, v, a, b, S0)
        return jnp.sum(y * cy) + jnp.sum(S * cS)
    return jax.jit(jax.grad(loss, argnums=tuple(range(7))))


GRADS = {"scan": _lib_loss(wkv7_scan), "chunked": _lib_loss(wkv7_chunked),
         "chunked5": _lib_loss(functools.partial(wkv7_chunked, chunk_size=5))}


@pytest.mark.parametrize("T", [7, 16, 64, 129])
@pytest.mark.parametrize("form", list(GRADS))
def test_gradients_match_fp64_reference(form, T):
    xs = make_inputs(T, seed=20 + T)
    rng = np.random.default_rng(T)
    cy, cS = rng.normal(size=xs[0].shape), rng.normal(size=xs[6].shape)
    g_ref = _ref64_grad(*(jnp.asarray(x, jnp.float64) for x in (*xs, cy, cS)))
    g = GRADS[form](*f32((*xs, cy, cS)))
    for name, gi, gr in zip("r w k v a b S0".split(), g, g_ref):
        assert gi.dtype == jnp.float32
        assert rel(gi, gr) < GRAD_TOL, (name, rel(gi, gr))


# --- 4. bf16 inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["scan", "chunked", "dispatch"])
def test_bf16_inputs(form):
    xs = make_inputs(129, seed=30)
    *seq, S0 = xs
    seq16 = [jnp.asarray(x, jnp.bfloat16) for x in seq]
    y, S = FORMS[form](*seq16, jnp.asarray(S0, jnp.float32))
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32  # state stays fp32
    # reference on the same bf16-rounded inputs: only the op's own error plus y's rounding
    y_ref, S_ref = wkv7_ref(*(np.asarray(x, np.float64) for x in seq16), S0)
    assert rel(y, y_ref) < BF16_TOL, rel(y, y_ref)
    assert rel(S, S_ref) < FWD_TOL, rel(S, S_ref)  # the state never passes through bf16
    assert rel(y, wkv7_ref(*xs)[0]) < BF16_INPUT_TOL

    grads = _grad_of_sum(form)(*seq16, jnp.asarray(S0, jnp.float32))
    for gi, x in zip(grads, (*seq16, S0)):
        assert gi.dtype == (jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32)
        assert bool(jnp.all(jnp.isfinite(gi)))
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(S)))


@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_finite_everywhere(decay):
    """Chunk 64 has the widest spans (e^{-38.8} at the strongest decay)."""
    xs = f32(make_inputs(129, seed=31, decay=decay))
    for form in ("chunked64",):
        y, S = FORMS[form](*xs)
        g = _grad_of_sum(form)(*xs)
        for t in (y, S, *g):
            assert bool(jnp.all(jnp.isfinite(t)))


# --- 5. dispatch ------------------------------------------------------------------------------


def test_dispatch_auto_and_errors():
    both = (WkvImpl.SCAN, WkvImpl.CHUNKED)
    assert resolve_impl("auto", "wkv7", both, "cpu") is WkvImpl.SCAN  # measured faster on CPU
    assert resolve_impl("auto", "wkv7", both, "gpu") is WkvImpl.CHUNKED
    assert resolve_impl("auto", "wkv7", both, "tpu") is WkvImpl.CHUNKED
    xs = f32(make_inputs(7, seed=40))
    y_s, S_s = wkv7(*xs, impl="scan")
    y_c, S_c = FORMS["chunked"](*xs)
    y_a, S_a = wkv7(*xs)  # AUTO on this test machine (CPU) is the scan form
    assert jax.default_backend() != "cpu" or (bool(jnp.all(y_a == y_s)) and bool(jnp.all(S_a == S_s)))
    assert rel(y_s, y_c) < FWD_TOL
    with pytest.raises(ValueError, match="valid: auto, scan, chunked, pallas"):
        wkv7(*xs, impl="associative")
    with pytest.raises(ValueError, match="unknown WKV implementation"):
        wkv7(*xs, impl="bogus")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7(*xs, impl="chunked", chunk_size=0)


# --- 6. packed documents (resets) ------------------------------------------------------------

# patterns at and right after the chunk boundaries of every chunk size tested
CHUNKS = (5, 16, 64)
# The reset checks compile one gradient per form and shape: at XLA:CPU's optimisation level 0
# (the same arithmetic, LLVM without its optimisation passes) that takes a fraction of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
RESET_FORMS = {"scan": wkv7_scan, "chunked": wkv7_chunked,
               "chunked5": functools.partial(wkv7_chunked, chunk_size=5),
               "chunked64": functools.partial(wkv7_chunked, chunk_size=64)}


@functools.cache
def _grads_and_values(form):
    """jit(grad) of <y, cy> + <S, cS> w.r.t. all seven inputs through a form with resets,
    also returning (y, S): one compile per form and shape for every reset pattern."""
    fn = RESET_FORMS[form]

    def loss(r, w, k, v, a, b, S0, cy, cS, resets):
        y, S = fn(r, w, k, v, a, b, S0, resets=resets)
        return jnp.sum(y.astype(jnp.float32) * cy) + jnp.sum(S * cS), (y, S)

    return jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True),
                   compiler_options=FAST_COMPILE)


def _by_documents(xs, resets):
    """The fp64 reference run one document at a time (no resets involved)."""
    *seq, S0 = xs

    def run(b, s, e, carried):
        return wkv7_ref(*(x[b:b + 1, s:e] for x in seq), S0[b:b + 1] if carried else None)

    return run_documents(resets, run)


def check_resets(form, xs, seed, patterns=None, tol=FWD_TOL, finite_only=()):
    """Every reset pattern: y and S against the fp64 loop with resets and against each
    document run alone; gradients (inputs and initial state) against an fp64 jax loop with
    resets (those named in ``finite_only``: finite only); a reset at t = 0 gives the
    initial state exactly zero gradient."""
    T = xs[0].shape[1]
    rng = np.random.default_rng(seed)
    cy, cS = rng.normal(size=xs[0].shape), rng.normal(size=xs[6].shape)
    for name, resets in (patterns or reset_patterns(B, T, CHUNKS)).items():
        g, (y, S) = _grads_and_values(form)(*f32((*xs, cy, cS)), resets)
        y_ref, S_ref = wkv7_ref(*xs, resets=resets)
        assert rel(y, y_ref) < tol and rel(S, S_ref) < tol, (name, rel(y, y_ref), rel(S, S_ref))
        for b, (y_doc, S_doc) in enumerate(_by_documents(xs, resets)):
            assert rel(y[b:b + 1], y_doc) < tol and rel(S[b:b + 1], S_doc) < tol, (name, b)
        g_ref = _ref64_grad(*(jnp.asarray(x, jnp.float64) for x in (*xs, cy, cS)), resets)
        for n_, gi, gr in zip("r w k v a b S0".split(), g, g_ref):
            assert bool(jnp.all(jnp.isfinite(gi))), (name, n_)
            assert n_ in finite_only or rel(gi, gr) < GRAD_TOL, (name, n_, rel(gi, gr))
        assert not np.any(np.asarray(g[6])[resets[:, 0]]), name  # exactly zero


def test_reference_loops_agree_with_resets():
    xs = make_inputs(64, seed=50)
    for name, resets in reset_patterns(B, 64, CHUNKS).items():
        y_ref, S_ref = wkv7_ref(*xs, resets=resets)
        y, S = _ref64(*(jnp.asarray(x, jnp.float64) for x in xs), resets)
        assert rel(y, y_ref) < 1e-12 and rel(S, S_ref) < 1e-12, name


@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("form", ["scan", "chunked", "chunked5"])
def test_resets_match_reference(form, T):
    check_resets(form, make_inputs(T, seed=60 + T), seed=T)


@pytest.mark.parametrize("decay", ["strong", "weak", "extreme"])
@pytest.mark.parametrize("form", ["scan", "chunked", "chunked64"])
def test_resets_decay_extremes(form, decay):
    """The model's strongest and weakest decays, and w = -20 (masked exponents would reach
    +320 in chunk 16), with resets: values and gradients.

    At w = -20 the true ∂/∂w is ~3e-8 (every path decays by e^-20), while the chunked
    form sums it from O(1) terms that cancel (the e^{G_i - G_i} = 1 diagonal, the last
    row's e^{G_last - G_last}): ~2e-7 absolute, resets or not, so there it is checked finite
    only (the scan's is exact)."""
    skip = ("w",) if decay == "extreme" and form != "scan" else ()
    check_resets(form, make_inputs(129, seed=61, decay=decay), seed=5, finite_only=skip)


@pytest.mark.parametrize("form", ["scan", "chunked5"])
def test_resets_generic_ab_and_zero_state(form):
    xs = make_inputs(64, seed=62, ab="generic", state=False)
    xs = (*xs[:6], np.zeros((B, H, N, N)))  # the zero state, passed (its gradient is checked)
    check_resets(form, xs, seed=6)


@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_resets_bf16_inputs(form):
    xs = make_inputs(129, seed=63)
    *seq, S0 = xs
    seq16 = [jnp.asarray(x, jnp.bfloat16) for x in seq]
    resets = reset_patterns(B, 129, CHUNKS)["boundary16"]
    y, S = FORMS[form](*seq16, jnp.asarray(S0, jnp.float32), resets=resets)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    y_ref, S_ref = wkv7_ref(*(np.asarray(x, np.float64) for x in seq16), S0, resets=resets)
    assert rel(y, y_ref) < BF16_TOL and rel(S, S_ref) < FWD_TOL


def test_resets_through_dispatch_and_step():
    """wkv7(impl=...) traces to exactly the form's program with resets; decoding token by
    token with ``reset_t`` (the step, and the dispatcher with T = 1) equals the scan."""
    xs = f32(make_inputs(20, seed=64))
    *seq, S0 = xs
    resets = reset_patterns(B, 20, CHUNKS)["short"]
    auto = {"scan": wkv7_scan, "chunked": wkv7_chunked}[resolve_impl(
        "auto", "wkv7", (WkvImpl.SCAN, WkvImpl.CHUNKED)).value]
    for impl, form in (("auto", auto), ("scan", wkv7_scan),
                       ("chunked", functools.partial(wkv7_chunked, chunk_size=8))):
        got = jax.make_jaxpr(functools.partial(wkv7, impl=impl, chunk_size=8,
                                               resets=resets))(*xs)
        want = jax.make_jaxpr(functools.partial(form, resets=resets))(*xs)
        assert str(got) == str(want) != str(jax.make_jaxpr(form)(*xs)), impl
    y, S = wkv7_scan(*xs, resets=resets)
    S_step, S_one, ys, ys1 = S0, S0, [], []
    for t in range(20):
        y_t, S_step = wkv7_step(*(x[:, t] for x in seq), S_step, resets[:, t])
        y_1, S_one = wkv7(*(x[:, t:t + 1] for x in seq), S_one, resets=resets[:, t:t + 1])
        ys.append(y_t)
        ys1.append(y_1)
    assert rel(jnp.stack(ys, 1), y) < FWD_TOL and rel(S_step, S) < FWD_TOL
    assert rel(jnp.concatenate(ys1, 1), y) < FWD_TOL and rel(S_one, S) < FWD_TOL


@pytest.mark.slow
@pytest.mark.parametrize("form", ["scan", "chunked"])
def test_resets_long_sequence(form):
    """T = 1000, many documents: values and gradients."""
    pats = reset_patterns(B, 1000, CHUNKS)
    check_resets(form, make_inputs(1000, seed=65), seed=7,
                 patterns={"short|boundary16": pats["short"] | pats["boundary16"]})


def test_resets_bad_shape():
    with pytest.raises(ValueError, match=r"resets must be \[B, T\]"):
        wkv7_scan(*f32(make_inputs(4, seed=66)), resets=np.zeros((B, 5), bool))


# --- 7. compile once --------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["step", "scan", "chunked"])
def test_eager_call_compiles_once(form):
    """The first eager call compiles, a second one with the same shapes and dtypes compiles
    nothing, with and without resets; the dispatcher reaching that form then compiles
    nothing either (it calls the same cached function). B = 3, T = 5, 6, 7 per form:
    shapes no other test uses, so that the first call must compile."""
    T = 5 + ["step", "scan", "chunked"].index(form)
    rng = np.random.default_rng(5)
    xs = [jnp.asarray(rng.normal(size=(3, T, H, N)) * 0.3, jnp.float32) for _ in range(6)]
    xs[1] = -jnp.abs(xs[1])  # log decay < 0
    S0 = jnp.asarray(rng.normal(size=(3, H, N, N)), jnp.float32)
    resets = jnp.asarray(rng.random((3, T)) < 0.5)
    x0, r0 = [x[:, 0] for x in xs], resets[:, 0]
    if form == "step":
        calls, dispatch = [lambda: wkv7_step(*x0, S0), lambda: wkv7_step(*x0, S0, r0)], []
    else:
        f = {"scan": wkv7_scan, "chunked": wkv7_chunked}[form]
        calls = [lambda: f(*xs, S0), lambda: f(*xs, S0, resets=resets)]
        impls = [form] + (["auto"] if resolve_impl(
            "auto", "wkv7", (WkvImpl.SCAN, WkvImpl.CHUNKED)).value == form else [])
        dispatch = [lambda impl=impl: wkv7(*xs, S0, impl=impl) for impl in impls]
        dispatch += [lambda impl=impl: wkv7(*xs, S0, impl=impl, resets=resets)
                     for impl in impls]
        # the same call spelled otherwise (keywords) is the same cache entry
        dispatch.append(lambda: f(*xs, state=S0, resets=resets))
    assert_compiled_once(calls, dispatch)
