"""RWKV-4 WKV: every form of the per-channel recurrence, side by side, one signature.

Legend (shapes): B batch, T time, C channels.
  w  [C]        log decay per step, ``w = -exp(time_decay) < 0`` (official ``W``)
  u  [C]        bonus for the current token, in log space (``time_first``)
  k  [B, T, C]  keys (enter as ``e^k``);  v [B, T, C] values
  state         :class:`Wkv4State` ``(aa, bb, pp)``, each [B, C] float32, with
                numerator ``a = aa·e^pp`` and denominator ``b = bb·e^pp``
  resets [B, T] optional bool document starts (below)

Output at step t (reference §2.1)::

    wkv_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t})
    a_t = e^w a_{t-1} + e^{k_t} v_t ;   b_t = e^w b_{t-1} + e^{k_t}

All forms take ``(w, u, k, v, state=None, *, resets=None)`` and return
``(y [B, T, C], final_state)``; ``state=None`` means the empty state (aa = bb = 0,
pp = -1e38). Accumulation is fp32 whatever the input dtype; ``y`` is returned in the dtype
of ``v``. A sequence can be split anywhere: running the prefix and feeding its final state
to the rest equals one call.

Packed documents: ``resets[b, t] = True`` means token t of row b starts a new document:
before token t is processed, the carried state of row b is replaced by the empty state
(aa = bb = 0, pp = ``PP_EMPTY``). A reset at t = 0 discards the ``state`` passed in (its
gradient is then exactly zero). Outputs at and after t, and the final state, equal running
that document alone from the empty state. ``resets=None`` traces exactly the computation
without resets (no extra cost).

Every public form is jitted by :func:`~rwkv_jax.ops.impl.jit_form`: an eager call
compiles once per shape/dtype/configuration (and ``resets`` given or not), however the
call is spelled; inside an outer jit or grad it is inlined.

Forms:
  * :func:`wkv4_step`         one token, the official stable (aa, bb, pp) update;
  * :func:`wkv4_scan`         ``lax.scan`` of the step (oracle; the fast form on CPU);
  * :func:`wkv4_associative`  log-space ``lax.associative_scan`` with a running max
                              (parallel over T; the fast form on GPU/TPU), segmented at
                              resets;
  * ``WkvImpl.PALLAS``        the Pallas kernels of :mod:`rwkv_jax.kernels.wkv4`
                              (imported on first use; never picked by AUTO);
  * :func:`wkv4`              dispatch through :class:`~rwkv_jax.ops.impl.WkvImpl`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from rwkv_jax.ops.impl import WkvImpl, check_resets, form_kwargs, jit_form, resolve_impl

# Empty-state running max, as in the official CUDA kernel (MIN_VALUE). Finite so that
# differences such as ``pp - q`` never become ``-inf - -inf = nan``.
PP_EMPTY = -1e38

SUPPORTED = (WkvImpl.SCAN, WkvImpl.ASSOCIATIVE, WkvImpl.PALLAS)


class Wkv4State(NamedTuple):
    """Carried WKV-4 state, each field [B, C] float32 (official pip layout: aa, bb, pp)."""

    aa: jax.Array
    bb: jax.Array
    pp: jax.Array

    @classmethod
    def zeros(cls, batch_size: int, channels: int) -> "Wkv4State":
        """The empty state: nothing seen yet."""
        z = jnp.zeros((batch_size, channels), jnp.float32)
        return cls(z, z, jnp.full((batch_size, channels), PP_EMPTY, jnp.float32))


def _prepare(w, u, k, v, state):
    """Defaults and float32 casts shared by the forms: the empty state for None, ``w, u``
    broadcast to [B, C], ``k, v`` cast to float32."""
    B, _, C = k.shape
    if state is None:
        state = Wkv4State.zeros(B, C)
    state = Wkv4State(*(jnp.asarray(s, jnp.float32) for s in state))
    # w, u: [C] -> [B, C], explicit so the ops also run under rank_promotion="raise"
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (B, C))
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32), (B, C))
    return w, u, k.astype(jnp.float32), v.astype(jnp.float32), state


def _reset(mask, aa, bb, pp):
    """The state with the rows where ``mask`` (broadcastable to [B, C]) replaced by the
    empty one."""
    zero = jnp.zeros((), jnp.float32)
    return (jnp.where(mask, zero, aa), jnp.where(mask, zero, bb),
            jnp.where(mask, jnp.float32(PP_EMPTY), pp))


def _output_weights(u, k_t, pp):
    """``(e1, e2)``: the weights of the state and of the bonus token in the output, scaled by
    ``e^-q`` with ``q = max(pp, u + k_t)`` so that both are at most 1."""
    q = jnp.maximum(pp, u + k_t)
    return jnp.exp(pp - q), jnp.exp(u + k_t - q)


def _output(u, k_t, v_t, aa, bb, pp):
    """wkv_t from the state before token t, stabilised by the running max ``q``."""
    e1, e2 = _output_weights(u, k_t, pp)
    return (e1 * aa + e2 * v_t) / (e1 * bb + e2)


@jit_form
def wkv4_step(w: jax.Array, u: jax.Array, k_t: jax.Array, v_t: jax.Array,
              state: Wkv4State, reset_t: jax.Array | None = None
              ) -> tuple[jax.Array, Wkv4State]:
    """One token. ``k_t, v_t``: [B, C] float32; ``state`` fields [B, C] float32.

    ``w, u``: [C] or [B, C]. ``reset_t``: optional bool [B]; where True the state is
    replaced by the empty one before the token (a document starts at it). Returns
    ``(y_t [B, C] float32, new_state)`` (official update).
    """
    aa, bb, pp = state
    if reset_t is not None:
        aa, bb, pp = _reset(jnp.asarray(reset_t, jnp.bool_)[:, None], aa, bb, pp)
    w = jnp.broadcast_to(w, k_t.shape)
    u = jnp.broadcast_to(u, k_t.shape)
    y = _output(u, k_t, v_t, aa, bb, pp)
    q = jnp.maximum(pp + w, k_t)
    e1 = jnp.exp((pp - q) + w)  # not pp + w - q: q may round pp + w off when |w| << ulp(pp)
    e2 = jnp.exp(k_t - q)
    return y, Wkv4State(e1 * aa + e2 * v_t, e1 * bb + e2, q)


@jit_form
def wkv4_scan(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
              state: Wkv4State | None = None, *,
              resets: jax.Array | None = None) -> tuple[jax.Array, Wkv4State]:
    """Sequential form: ``lax.scan`` of :func:`wkv4_step` over T. Shapes and ``resets`` as
    the module docstring.

    Differentiated by a hand-written reverse scan (:func:`_scan_bwd`) instead of autodiff
    of the loop body: one fused pass per step, and only the per-step state is kept.
    """
    out_dtype = v.dtype
    resets = check_resets(resets, *k.shape[:2])
    w, u, k, v, state = _prepare(w, u, k, v, state)
    kt, vt = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)  # time-major [T, B, C]
    rt = None if resets is None else jnp.swapaxes(resets, 0, 1)  # [T, B]
    y, aa, bb, pp = _scan_core(w, u, kt, vt, *state, rt)
    return jnp.swapaxes(y, 0, 1).astype(out_dtype), Wkv4State(aa, bb, pp)


def _scan_run(w, u, kt, vt, aa, bb, pp, rt):
    """The forward scan: (y [T,B,C], final state, states before each token [T,B,C] x3).

    The states kept are those carried in, before any reset (the backward needs the state
    after token t - 1 for the running-max chain; it re-applies the reset itself)."""

    def body(carry, xs):
        k_t, v_t, r_t = xs
        y_t, new = wkv4_step(w, u, k_t, v_t, carry, r_t)
        return new, (y_t, *carry)

    (aa, bb, pp), (y, aa_prev, bb_prev, pp_prev) = jax.lax.scan(
        body, Wkv4State(aa, bb, pp), (kt, vt, rt))
    return y, (aa, bb, pp), (aa_prev, bb_prev, pp_prev)


@jax.custom_vjp
def _scan_core(w, u, kt, vt, aa, bb, pp, rt):
    """float32 ``w, u`` [B, C], time-major ``kt, vt`` [T, B, C], state fields [B, C],
    time-major resets ``rt`` [T, B] or None -> ``(y [T, B, C], aa, bb, pp)``."""
    y, final, _ = _scan_run(w, u, kt, vt, aa, bb, pp, rt)
    return (y, *final)


def _scan_fwd(w, u, kt, vt, aa, bb, pp, rt):
    y, final, prev = _scan_run(w, u, kt, vt, aa, bb, pp, rt)
    return (y, *final), (w, u, kt, vt, rt, y, prev, final)


def wkv4_bwd_step(w, u, k_t, v_t, y_t, g_t, aa, bb, pp, pp_t, carry, reset_t=None):
    """One reverse step of :func:`_scan_bwd` (shared with the Pallas backward kernel in
    :mod:`rwkv_jax.kernels.wkv4`).

    ``aa, bb, pp``: the state carried into token t; ``pp_t``: the running max after it;
    ``g_t``: the cotangent of ``y_t``; ``carry = (α̃_t, β̃_t, ḡ_pp_t, gw, gu)``;
    ``reset_t``: None, or a bool mask broadcastable to [B, C] (the token started a
    document). Returns the carry for t - 1 (with gw, gu accumulated) and ``(gk_t, gv_t)``.
    """
    if reset_t is not None:
        # the token saw the empty state; the state carried in gets no gradient (below)
        aa, bb, pp = _reset(reset_t, aa, bb, pp)
    alpha, beta, gpp, gw, gu = carry
    e1, e2 = _output_weights(u, k_t, pp)
    gd = g_t / (e1 * bb + e2)
    g_bonus = gd * e2
    g_bonus_k = g_bonus * (v_t - y_t)  # through the bonus term's e^{u+k_t}: for k_t and u
    decay = jnp.exp((pp - pp_t) + w)
    ek = jnp.exp(k_t - pp_t)
    from_k = k_t >= pp + w  # which side of pp_t = max(pp + w, k_t) was taken
    gk = g_bonus_k + ek * (alpha * v_t + beta) + jnp.where(from_k, gpp, 0.0)
    gv = g_bonus + ek * alpha
    gw = gw + decay * (alpha * aa + beta * bb) + jnp.where(from_k, 0.0, gpp)
    gu = gu + g_bonus_k
    alpha = gd * e1 + decay * alpha
    beta = -gd * e1 * y_t + decay * beta
    gpp = jnp.where(from_k, 0.0, gpp)
    if reset_t is not None:
        # the empty state is a constant: exactly zero adjoint for what was carried in (the
        # weights above already underflow to 0 through pp = PP_EMPTY; this does not rely on it)
        alpha, beta, gpp = (jnp.where(reset_t, 0.0, x) for x in (alpha, beta, gpp))
    return (alpha, beta, gpp, gw, gu), gk, gv


def _scan_bwd(res, cot):
    """Reverse scan for the gradients, in the forward's stabilised frame.

    With ``a_t = aa_t·e^{pp_t}`` (likewise b), the adjoints ``α_t = ∂L/∂a_t`` are carried as
    ``α̃_t = α_t·e^{pp_t}`` (β̃ likewise), which keeps every factor bounded:
    ``α̃_{t-1} = g_t·e1/den + e^{w + pp_{t-1} - pp_t}·α̃_t`` with ``den = e1·bb + e2`` as in
    the output, and ``∂/∂k_t`` of the state update is ``e^{k_t - pp_t}(α̃_t v_t + β̃_t)``.
    The final state's cotangent enters as ``α̃_T = ḡ_aa``, ``β̃_T = ḡ_bb``; its ``pp`` (a
    running max, ``pp_t = max(pp_{t-1} + w, k_t)``) carries ``ḡ_pp - ḡ_aa·aa - ḡ_bb·bb``
    back along the chain of maxima to the k or initial pp it came from. A reset at token t
    ends every chain there: the adjoints of the state carried into t are zero.
    """
    w, u, kt, vt, rt, y, (aa_prev, bb_prev, pp_prev), (aa_T, bb_T, pp_T) = res
    gy, g_aa, g_bb, g_pp = cot
    pp_next = jnp.concatenate([pp_prev[1:], pp_T[None]], axis=0)  # pp_t, the state after t

    def body(carry, xs):
        *xs, r_t = xs
        carry, gk, gv = wkv4_bwd_step(w, u, *xs, carry,
                                  reset_t=None if r_t is None else r_t[:, None])
        return carry, (gk, gv)

    zero = jnp.zeros_like(aa_T)
    init = (g_aa, g_bb, g_pp - g_aa * aa_T - g_bb * bb_T, zero, zero)
    (alpha, beta, gpp, gw, gu), (gk, gv) = jax.lax.scan(
        body, init, (kt, vt, y, gy, aa_prev, bb_prev, pp_prev, pp_next, rt), reverse=True)
    aa0, bb0 = aa_prev[0], bb_prev[0]
    return gw, gu, gk, gv, alpha, beta, gpp + alpha * aa0 + beta * bb0, None


_scan_core.defvjp(_scan_fwd, _scan_bwd)


def _combine(w):
    """Associative operator on segments ``(n, p, a, b[, f])``: n tokens, values a·e^p,
    b·e^p, and with resets a flag ``f``: the segment contains a document start.

    Left segment first: its contents decay by ``w·n2`` across the right segment; a document
    start inside the right segment empties the left one (a segmented scan).
    """

    def op(left, right):
        n1, p1, a1, b1, *f1 = left
        n2, p2, a2, b2, *f2 = right
        p1d = p1 + w * n2
        if f2:
            # the left contents count as the empty state: weight e^{PP_EMPTY - m} = 0
            p1d = jnp.where(f2[0], jnp.float32(PP_EMPTY), p1d)
        m = jnp.maximum(p1d, p2)
        e1 = jnp.exp(p1d - m)
        e2 = jnp.exp(p2 - m)
        out = (n1 + n2, m, e1 * a1 + e2 * a2, e1 * b1 + e2 * b2)
        return out + ((f1[0] | f2[0],) if f2 else ())

    return op


@jit_form
def wkv4_associative(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
                     state: Wkv4State | None = None, *,
                     resets: jax.Array | None = None) -> tuple[jax.Array, Wkv4State]:
    """Parallel form: inclusive log-space ``lax.associative_scan`` over T.

    Token i is the segment ``(1, k_i, v_i, 1)`` (with resets, flagged when a document starts
    at it); the scan gives the state after each token without the initial state, which is
    then folded in on the left (it decays by ``w·t``, and is dropped after the first reset).
    The state before token t (shifted by one; the empty state where a document starts at t)
    feeds the bonus output of :func:`wkv4_step`.
    """
    out_dtype = v.dtype
    resets = check_resets(resets, *k.shape[:2])
    w, u, k, v, (aa0, bb0, pp0) = _prepare(w, u, k, v, state)
    B, T, C = k.shape
    n = jnp.broadcast_to(jnp.arange(1, T + 1, dtype=jnp.float32)[None, :, None], (B, T, C))
    ones = jnp.ones_like(k)
    w, u = w[:, None], u[:, None]  # [B, 1, C]
    f = () if resets is None else (resets[..., None],)  # [B, T, 1]
    _, p, a, b, *f = jax.lax.associative_scan(_combine(w), (ones, k, v, ones, *f), axis=1)
    # fold the initial state in on the left: (0, pp0, aa0, bb0) ⊕ (n_t, p_t, a_t, b_t)
    f0 = (False,) if f else ()
    _, p, a, b, *_ = _combine(w)((0.0, pp0[:, None], aa0[:, None], bb0[:, None], *f0),
                                 (n, p, a, b, *f))
    # state before token t: the initial state for t = 0, else the scan result at t - 1
    prev = [jnp.concatenate([s0[:, None], s[:, :-1]], axis=1)
            for s0, s in ((aa0, a), (bb0, b), (pp0, p))]
    if resets is not None:
        prev = _reset(resets[..., None], *prev)
    y = _output(u, k, v, *prev)
    return y.astype(out_dtype), Wkv4State(a[:, -1], b[:, -1], p[:, -1])


def _pallas(*args, **kwargs):
    """``WkvImpl.PALLAS``: :func:`rwkv_jax.kernels.wkv4.wkv4_pallas`, imported on first use
    (the kernels are optional)."""
    try:
        from rwkv_jax.kernels.wkv4 import wkv4_pallas
    except ImportError as e:
        raise NotImplementedError(f"wkv4 'pallas' form unavailable: {e}") from None
    return wkv4_pallas(*args, **kwargs)


_FORMS = {WkvImpl.SCAN: wkv4_scan, WkvImpl.ASSOCIATIVE: wkv4_associative,
          WkvImpl.PALLAS: _pallas}


def wkv4(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
         state: Wkv4State | None = None, *, impl: WkvImpl | str = WkvImpl.AUTO,
         resets: jax.Array | None = None) -> tuple[jax.Array, Wkv4State]:
    """RWKV-4 WKV through the form ``impl`` names (AUTO: by platform). See module docstring.

    ``impl`` is resolved here, in Python, and the (jitted) form is called: an eager call
    compiles once per shape, and the traced program is exactly the form's.
    """
    form = resolve_impl(impl, "wkv4", SUPPORTED)
    return _FORMS[form](w, u, k, v, state, **form_kwargs(form, resets=resets))
