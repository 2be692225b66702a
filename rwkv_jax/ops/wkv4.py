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
  * :func:`wkv4_pallas`       Pallas kernel (Triton backend on GPU; interpret mode on CPU):
                              one program per (batch, channel block) runs the step loop,
                              with a Pallas reverse-time kernel for the backward. Never
                              picked by AUTO (not yet measured on a GPU);
  * :func:`wkv4`              dispatch through :class:`~rwkv_jax.ops.impl.WkvImpl`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_jax.ops.impl import WkvImpl, check_resets, jit_form, resolve_impl

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


def _prepare(w, u, k, v, state, *, cast_kv: bool = True):
    """Defaults and float32 casts shared by the forms: the empty state for None, ``w, u``
    broadcast to [B, C]; ``k, v`` cast to float32 unless ``cast_kv`` is False (the Pallas
    kernels read them in their own dtype)."""
    B, _, C = k.shape
    if state is None:
        state = Wkv4State.zeros(B, C)
    state = Wkv4State(*(jnp.asarray(s, jnp.float32) for s in state))
    # w, u: [C] -> [B, C], explicit so the ops also run under rank_promotion="raise"
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (B, C))
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32), (B, C))
    if cast_kv:
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    return w, u, k, v, state


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


def _bwd_step(w, u, k_t, v_t, y_t, g_t, aa, bb, pp, pp_t, carry, reset_t=None):
    """One reverse step of :func:`_scan_bwd` (shared with the Pallas backward kernel).

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
        carry, gk, gv = _bwd_step(w, u, *xs, carry,
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


# ----------------------------------------------------------------------------- Pallas

# Channels per program. The official CUDA kernel runs one thread per (batch, channel) in
# blocks of min(C, 32) threads; 32 channels and one warp per program is the same layout
# (B·C/32 programs). Not tuned on a GPU yet: ``block_c=`` overrides it. Kept at 32 when
# C < 32 too (only toy widths; the padding costs nothing that matters there).
PALLAS_BLOCK_C = 32


def _pallas_block_c(block_c: int | None) -> int:
    block_c = PALLAS_BLOCK_C if block_c is None else block_c
    if block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two, got {block_c}")
    return block_c


def _pallas_call(kernel, out_shape, in_specs, out_specs, grid, block_c, interpret):
    """``pl.pallas_call`` on the Triton backend, or in interpret mode. Triton is named by its
    compiler params: without them a GPU pallas_call lowers to Mosaic GPU (jax 0.10, 0.11)."""
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=max(1, block_c // 32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                          out_specs=out_specs, compiler_params=params,
                          interpret=interpret, name=kernel.__name__)


# Block layout, shared by both kernels; grid (B, C_pad // block_c), one program per
# (batch row, channel block). Time-series arrays stay [B, T, C] with block (1, T, block_c)
# (T not padded: the Triton lowering turns a block into a base offset and only needs the
# arrays that are loaded or stored to have a power-of-two size, here one [block_c] row per
# step, ``ref[0, t, :]``: 32 contiguous floats, one coalesced access per warp); per-row
# arrays ([B, C]: w, u, the state fields, the gw/gu partial sums) have block (1, block_c).
def _specs(block_c, T, kinds):
    seq = pl.BlockSpec((1, T, block_c), lambda b, c: (b, 0, c))
    row = pl.BlockSpec((1, block_c), lambda b, c: (b, c))
    return [seq if kd == "seq" else row for kd in kinds]


def _pallas_fwd_kernel(w_ref, u_ref, k_ref, v_ref, aa_ref, bb_ref, pp_ref,
                       y_ref, aa_out, bb_out, pp_out, *prev_refs):
    """One (b, channel block): the step loop over T; state in values (registers).

    With ``prev_refs`` (aa, bb, pp [1, T, block_c]) it also writes the state before each
    token, which the backward kernel reads (what ``_scan_fwd`` keeps).
    """
    w, u = w_ref[0, :], u_ref[0, :]

    def body(t, carry):
        k_t = k_ref[0, t, :].astype(jnp.float32)
        v_t = v_ref[0, t, :].astype(jnp.float32)
        for ref, s in zip(prev_refs, carry):
            ref[0, t, :] = s
        y_t, new = wkv4_step(w, u, k_t, v_t, Wkv4State(*carry))
        y_ref[0, t, :] = y_t
        return tuple(new)

    init = (aa_ref[0, :], bb_ref[0, :], pp_ref[0, :])
    aa, bb, pp = jax.lax.fori_loop(0, k_ref.shape[1], body, init)
    aa_out[0, :], bb_out[0, :], pp_out[0, :] = aa, bb, pp


def _pallas_bwd_kernel(w_ref, u_ref, k_ref, v_ref, y_ref, gy_ref, aap_ref, bbp_ref, ppp_ref,
                       aaT_ref, bbT_ref, ppT_ref, gaa_ref, gbb_ref, gpp_ref,
                       gk_ref, gv_ref, gw_ref, gu_ref, gaa0_ref, gbb0_ref, gpp0_ref):
    """One (b, channel block): the reverse-time loop of :func:`_scan_bwd` (same step,
    :func:`_bwd_step`), carrying the running max after token t (``pp_T`` at the start).
    Writes gk, gv per step; gw, gu as this row's sums (reduced over B by the caller)."""
    w, u = w_ref[0, :], u_ref[0, :]
    T = k_ref.shape[1]

    def body(i, carry):
        carry, pp_t = carry[:5], carry[5]
        t = T - 1 - i
        k_t = k_ref[0, t, :].astype(jnp.float32)
        v_t = v_ref[0, t, :].astype(jnp.float32)
        pp = ppp_ref[0, t, :]
        carry, gk, gv = _bwd_step(w, u, k_t, v_t, y_ref[0, t, :], gy_ref[0, t, :],
                                  aap_ref[0, t, :], bbp_ref[0, t, :], pp, pp_t, carry)
        gk_ref[0, t, :] = gk.astype(gk_ref.dtype)
        gv_ref[0, t, :] = gv.astype(gv_ref.dtype)
        return (*carry, pp)

    g_aa, g_bb, aa_T, bb_T = gaa_ref[0, :], gbb_ref[0, :], aaT_ref[0, :], bbT_ref[0, :]
    zero = jnp.zeros_like(g_aa)
    init = (g_aa, g_bb, gpp_ref[0, :] - g_aa * aa_T - g_bb * bb_T, zero, zero, ppT_ref[0, :])
    alpha, beta, gpp, gw, gu, _ = jax.lax.fori_loop(0, T, body, init)
    gw_ref[0, :], gu_ref[0, :] = gw, gu
    gaa0_ref[0, :], gbb0_ref[0, :] = alpha, beta
    gpp0_ref[0, :] = gpp + alpha * aap_ref[0, 0, :] + beta * bbp_ref[0, 0, :]


def _pallas_forward(block_c, interpret, w, u, k, v, aa, bb, pp, save):
    B, T, C = k.shape
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    out_shape = [f32((B, T, C)), f32((B, C)), f32((B, C)), f32((B, C))]
    out_kinds = ["seq", "row", "row", "row"]
    if save:
        out_shape += [f32((B, T, C))] * 3
        out_kinds += ["seq"] * 3
    out = _pallas_call(_pallas_fwd_kernel, out_shape,
                       _specs(block_c, T, ["row", "row", "seq", "seq", "row", "row", "row"]),
                       _specs(block_c, T, out_kinds), (B, C // block_c), block_c, interpret,
                       )(w, u, k, v, aa, bb, pp)
    return tuple(out[:4]), tuple(out[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_core(block_c, interpret, w, u, k, v, aa, bb, pp):
    """float32 ``w, u`` and state fields [B, C], ``k, v`` [B, T, C] (any float dtype), C a
    multiple of ``block_c`` -> ``(y [B, T, C] float32, aa, bb, pp)``."""
    return _pallas_forward(block_c, interpret, w, u, k, v, aa, bb, pp, save=False)[0]


def _pallas_core_fwd(block_c, interpret, w, u, k, v, aa, bb, pp):
    out, prev = _pallas_forward(block_c, interpret, w, u, k, v, aa, bb, pp, save=True)
    return out, (w, u, k, v, out, prev)


def _pallas_core_bwd(block_c, interpret, res, cot):
    w, u, k, v, (y, aa_T, bb_T, pp_T), prev = res
    gy, g_aa, g_bb, g_pp = cot
    B, T, C = k.shape
    row = jax.ShapeDtypeStruct((B, C), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *[row] * 5]
    in_kinds = ["row", "row", "seq", "seq", "seq", "seq", "seq", "seq", "seq", *["row"] * 6]
    gk, gv, gw, gu, g_aa0, g_bb0, g_pp0 = _pallas_call(
        _pallas_bwd_kernel, out_shape, _specs(block_c, T, in_kinds),
        _specs(block_c, T, ["seq", "seq", *["row"] * 5]), (B, C // block_c), block_c,
        interpret,
    )(w, u, k, v, y, gy, *prev, aa_T, bb_T, pp_T, g_aa, g_bb, g_pp)
    return gw, gu, gk, gv, g_aa0, g_bb0, g_pp0


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def wkv4_pallas(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
                state: Wkv4State | None = None, *, interpret: bool | None = None,
                block_c: int | None = None) -> tuple[jax.Array, Wkv4State]:
    """Pallas form: a fused kernel running :func:`wkv4_step` over T per (batch, channel
    block), differentiated by a Pallas reverse-time kernel doing :func:`_scan_bwd`'s step.

    Shapes and contract as the module legend: ``w, u`` [C] (or [B, C]), ``k, v`` [B, T, C]
    (read in their own dtype, accumulated in float32), ``state`` fields [B, C] float32 or
    None; returns ``(y [B, T, C] in v's dtype, final state float32)``. The same float32
    operations in the same order as :func:`wkv4_scan`, forward and backward (bit for bit in
    interpret mode; compiled, Triton's exp and division may differ from XLA's by ulps).

    Grid (B, ceil(C / block_c)); ``block_c`` (a power of two) defaults to
    ``PALLAS_BLOCK_C`` (32). C is zero-padded up to a multiple of it
    (padded channels: empty state, w = -1; sliced off). The forward kernel also writes the
    state before each token for the backward (3 x [B, T, C] float32, as ``wkv4_scan``).

    ``interpret``: run the kernels through Pallas' interpreter (None: when JAX's default
    backend is the CPU; compiled otherwise). Compiled means the Pallas Triton backend: GPU
    only (TPU would need its own kernel).
    """
    out_dtype = v.dtype
    B, T, C = k.shape
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    bc = _pallas_block_c(block_c)
    w, u, k, v, (aa, bb, pp) = _prepare(w, u, k, v, state, cast_kv=False)
    if T == 0:
        return jnp.zeros((B, 0, C), out_dtype), Wkv4State(aa, bb, pp)
    pad = -C % bc
    if pad:
        def row(x, fill):
            return jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)

        w, u, aa, bb, pp = row(w, -1.0), row(u, 0.0), row(aa, 0.0), row(bb, 0.0), row(pp, PP_EMPTY)
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (k, v))
    y, aa, bb, pp = _pallas_core(bc, bool(interpret), w, u, k, v, aa, bb, pp)
    if pad:
        y, aa, bb, pp = y[..., :C], aa[:, :C], bb[:, :C], pp[:, :C]
    return y.astype(out_dtype), Wkv4State(aa, bb, pp)


_FORMS = {WkvImpl.SCAN: wkv4_scan, WkvImpl.ASSOCIATIVE: wkv4_associative,
          # jitted here so that an eager dispatch compiles once, like the other forms
          WkvImpl.PALLAS: jit_form(wkv4_pallas, static_argnames=("interpret", "block_c"))}


def wkv4(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
         state: Wkv4State | None = None, *, impl: WkvImpl | str = WkvImpl.AUTO,
         resets: jax.Array | None = None) -> tuple[jax.Array, Wkv4State]:
    """RWKV-4 WKV through the form ``impl`` names (AUTO: by platform). See module docstring.

    ``impl`` is resolved here, in Python, and the (jitted) form is called: an eager call
    compiles once per shape, and the traced program is exactly the form's.
    """
    form = _FORMS[resolve_impl(impl, "wkv4", SUPPORTED)]
    if resets is None:
        return form(w, u, k, v, state)
    return form(w, u, k, v, state, resets=resets)
