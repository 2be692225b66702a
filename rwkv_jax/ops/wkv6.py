"""RWKV-5/6 WKV: matrix state with diagonal decay, every form side by side, one signature.

Legend (shapes): B batch, T time, H heads, N head size (key and value channels alike).
  r, k, v  [B, T, H, N]  receptance, key, value (any float dtype; computed in fp32)
  w        [B, T, H, N]  LOG decay per step, ``w = -exp(w_raw) <= 0``; anything broadcastable
                         to [B, T, H, N] (RWKV-5 passes its per-(head, key) decay as [H, N])
  u        [H, N]        bonus for the current token, linear (``time_faaaa``)
  S        [B, H, N, N]  float32 state per head, indexed [key i, value j] (pip / FLA layout)

Per head, at step t (reference §3.1, §4.1)::

    y_t[j] = Σ_i r_t[i]·( u[i]·k_t[i]·v_t[j] + S[i, j] )
    S[i, j] <- exp(w_t[i])·S[i, j] + k_t[i]·v_t[j]

All forms take ``(r, w, k, v, u, state=None)`` and return ``(y [B, T, H, N], final_state)``;
``state=None`` means the zero state. Accumulation is fp32 whatever the input dtype, the state
stays fp32 and ``y`` is returned in the dtype of ``v``. A sequence can be split anywhere:
running the prefix and feeding its final state to the rest equals one call. RWKV-5 is the
special case of a decay that is constant over time.

Forms:
  * :func:`wkv6_step`         one token;
  * :func:`wkv6_scan`         ``lax.scan`` of the step over T (the oracle);
  * :func:`wkv6_chunked`      intra-chunk matmuls plus a scan over chunks (reference §4.3);
  * :func:`wkv6_associative`  ``lax.associative_scan`` over (decay, outer product) pairs;
                              materialises one N×N state per token, so short sequences only;
  * :func:`wkv6`              dispatch through :class:`~rwkv_jax.ops.impl.WkvImpl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops.impl import WkvImpl, resolve_impl

SUPPORTED = (WkvImpl.SCAN, WkvImpl.CHUNKED, WkvImpl.ASSOCIATIVE)

# Sub-chunk length of the chunked form (FLA's BC). Exponent tensors of the diagonal blocks
# cost chunk_size·SUB_CHUNK·N per chunk, so this stays small.
SUB_CHUNK = 16

# Per-step log decays are clamped here. exp(-1e4) is 0 in fp32 as is exp(-inf), so values and
# gradients are unchanged, but the chunked form's 0/1-mask matmuls would turn -inf into
# 0·(-inf) = NaN and chunk sums of ~-1e38 into -inf.
LOG_DECAY_MIN = -1e4

# Exponent sums must not go through reduced-precision matmul passes (TF32 / bf16 on GPU/TPU):
# an error δ in an exponent is a relative error δ in its term.
_EXACT = jax.lax.Precision.HIGHEST


def _prepare(r, w, k, v, u, state):
    """Cast to fp32, broadcast ``w`` to ``k``'s shape, check shapes, build the zero state."""
    if not (r.shape == k.shape == v.shape) or k.ndim != 4:
        raise ValueError(f"r, k, v must share one [B, T, H, N] shape; got "
                         f"{r.shape}, {k.shape}, {v.shape}")
    B, _, H, N = k.shape
    if tuple(jnp.shape(u)) != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}; got {tuple(jnp.shape(u))}")
    if state is None:
        state = jnp.zeros((B, H, N, N), jnp.float32)
    if tuple(jnp.shape(state)) != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = {(B, H, N, N)}; "
                         f"got {tuple(jnp.shape(state))}")
    w = jnp.maximum(jnp.broadcast_to(jnp.asarray(w, jnp.float32), k.shape), LOG_DECAY_MIN)
    return (r.astype(jnp.float32), w, k.astype(jnp.float32), v.astype(jnp.float32),
            jnp.asarray(u, jnp.float32), jnp.asarray(state, jnp.float32))


def wkv6_step(r_t: jax.Array, w_t: jax.Array, k_t: jax.Array, v_t: jax.Array, u: jax.Array,
              S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token. ``r_t, k_t, v_t``: [B, H, N]; ``w_t`` log decay broadcastable to [B, H, N];
    ``u``: [H, N]; ``S``: [B, H, N, N] float32 [key, value].

    Computes in fp32 and returns ``(y_t [B, H, N] in v_t's dtype, new S float32)``.
    """
    out_dtype = v_t.dtype
    r_t, k_t, v_t = (x.astype(jnp.float32) for x in (r_t, k_t, v_t))
    w_t = jnp.maximum(jnp.broadcast_to(jnp.asarray(w_t, jnp.float32), k_t.shape), LOG_DECAY_MIN)
    u = jnp.asarray(u, jnp.float32)
    S = jnp.asarray(S, jnp.float32)
    # y_j = (Σ_i r_i u_i k_i)·v_j + Σ_i r_i S_ij
    bonus = jnp.sum(r_t * u[None] * k_t, axis=-1, keepdims=True)
    y = bonus * v_t + jnp.einsum("bhi,bhij->bhj", r_t, S)
    S = jnp.exp(w_t)[..., None] * S + k_t[..., None] * v_t[..., None, :]
    return y.astype(out_dtype), S


def wkv6_scan(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
              state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sequential form: ``lax.scan`` of :func:`wkv6_step` over T. Shapes as the module legend."""
    out_dtype = v.dtype
    r, w, k, v, u, state = _prepare(r, w, k, v, u, state)

    def body(S, x_t):
        y_t, S = wkv6_step(*x_t[:3], x_t[3], u, S)
        return S, y_t

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (r, w, k, v))  # time-major [T, B, H, N]
    state, y = jax.lax.scan(body, state, xs)
    return jnp.swapaxes(y, 0, 1).astype(out_dtype), state


def _exclusive_cumsum(x, axis):
    """Σ over earlier positions along ``axis`` (0 at the first). Not ``cumsum(x) - x``: that
    subtraction cancels, and an error δ in a log decay is a relative error δ in its factor."""
    c = jnp.cumsum(x, axis=axis)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    return jnp.concatenate([zero, jax.lax.slice_in_dim(c, 0, x.shape[axis] - 1, axis=axis)],
                           axis=axis)


def _strictly_between(lo, hi, n):
    """0/1 float32 mask ``M[..., m] = lo[...] < m < hi[...]`` for m in range(n)."""
    m = jnp.arange(n).reshape((1,) * lo.ndim + (n,))
    return ((lo[..., None] < m) & (m < hi[..., None])).astype(jnp.float32)


def wkv6_chunked(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
                 state: jax.Array | None = None, *,
                 chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Chunked form (reference §4.3): intra-chunk matmuls, a ``lax.scan`` over chunks for S.

    Within a chunk with start state S0, with every log-decay sum taken over the tokens
    strictly between the two positions involved (``D(a, b) = Σ_{a<m<b} w_m <= 0``)::

        y_t   = Σ_i r_t,i e^{D(-1, t)_i} S0_i  +  Σ_{j<t} [Σ_i r_t,i k_j,i e^{D(j, t)_i}] v_j
                + (Σ_i r_t,i u_i k_t,i) v_t
        S_end = e^{D(-1, L)} ⊙ S0  +  Σ_j (k_j ⊙ e^{D(j, L)}) v_jᵀ

    Chunks are split into sub-chunks of :data:`SUB_CHUNK`. For a query sub-chunk starting at
    ``s`` and a key ``j < s`` the factor splits at the reference point ``s``:
    ``e^{D(j,t)} = e^{D(s-1, t)}·e^{D(j, s)}`` with both exponents <= 0, so the block is a
    matmul of ``r·e^{..}`` and ``k·e^{..}`` that can neither overflow nor lose a term that
    matters (if a factor underflows, so does the product). Diagonal sub-chunks are
    element-wise with exponents masked to -inf before ``exp``.

    Every ``D`` is summed directly from the log decays it spans (prefix / suffix sums inside
    the chunk, 0/1-mask matmuls otherwise), never as a difference of two cumulative sums: with
    per-token decays down to ~-150 such a difference cancels and its fp32 error (~ulp of
    the chunk total) becomes the relative error of terms of order 1.

    T need not be a multiple of ``chunk_size``: the tail is padded with r = k = v = 0 and
    w = 0, which leaves the state unchanged, and cut off. ``chunk_size`` must be a multiple
    of :data:`SUB_CHUNK` or smaller than it.
    """
    out_dtype = v.dtype
    r, w, k, v, u, state = _prepare(r, w, k, v, u, state)
    B, T, H, N = k.shape
    L = chunk_size
    s = min(SUB_CHUNK, L)
    if L < 1 or L % s:
        raise ValueError(f"chunk_size must be positive and a multiple of {SUB_CHUNK} "
                         f"(or smaller than it); got {chunk_size}")
    n_sub = L // s
    n_chunks = -(-T // L)
    pad = n_chunks * L - T

    def to_chunks(x):  # [B, T, H, N] -> [B, H, nC, L, N]
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, n_chunks, L, H, N).transpose(0, 3, 1, 2, 4)

    r_c, w_c, k_c, v_c = (to_chunks(x) for x in (r, w, k, v))
    sub = lambda x: x.reshape(B, H, n_chunks, n_sub, s, N)  # noqa: E731  [.., nC, a, s, N]
    r_s, w_s, k_s, v_s = (sub(x) for x in (r_c, w_c, k_c, v_c))

    # ---- inter-sub-chunk blocks: query sub-chunk a (start a·s), keys j < a·s of the chunk
    # D(a·s - 1, t) for t in sub-chunk a: exclusive prefix inside the sub-chunk
    q_exp = _exclusive_cumsum(w_s, axis=4)
    q_til = r_s * jnp.exp(q_exp)                                   # [B, H, nC, a, s, N]
    # D(j, a·s) = Σ_{j<m<a·s} w_m, for every a and every key position j of the chunk
    start = jnp.arange(n_sub) * s
    M_key = _strictly_between(jnp.broadcast_to(jnp.arange(L)[None, :], (n_sub, L)),
                              jnp.broadcast_to(start[:, None], (n_sub, L)), L)  # [a, j, m]
    k_exp = jnp.einsum("ajm,bhcmn->bhcajn", M_key, w_c, precision=_EXACT)
    key_before = (jnp.arange(L)[None, :] < start[:, None])[None, None, None, :, :, None]
    # mask before exp: a masked exponent may be anything, its factor must be exactly 0
    k_til = k_c[:, :, :, None] * jnp.exp(jnp.where(key_before, k_exp, -jnp.inf))
    A_inter = jnp.einsum("bhcatn,bhcajn->bhcatj", q_til, k_til)     # [B, H, nC, a, s, L]
    y = jnp.einsum("bhcatj,bhcjn->bhcatn", A_inter, v_c)

    # ---- diagonal sub-chunks: D(j, t) for j < t inside the sub-chunk, element-wise
    pos = jnp.arange(s)
    M_diag = _strictly_between(jnp.broadcast_to(pos[None, :], (s, s)),
                               jnp.broadcast_to(pos[:, None], (s, s)), s)  # [t, j, m]
    d_exp = jnp.einsum("tjm,bhcamn->bhcatjn", M_diag, w_s, precision=_EXACT)
    causal = (pos[None, :] < pos[:, None])[None, None, None, None, :, :, None]
    A_diag = jnp.einsum("bhcatn,bhcajn,bhcatjn->bhcatj", r_s, k_s,
                        jnp.exp(jnp.where(causal, d_exp, -jnp.inf)))
    y = y + jnp.einsum("bhcatj,bhcajn->bhcatn", A_diag, v_s)
    # the current token's bonus: (Σ_i r_i u_i k_i)·v_t
    bonus = jnp.sum(r_s * u[None, :, None, None, None, :] * k_s, axis=-1, keepdims=True)
    y = (y + bonus * v_s).reshape(B, H, n_chunks, L, N)

    # ---- across chunks: S_end = e^{D(-1, L)} ⊙ S0 + Σ_j (k_j ⊙ e^{D(j, L)}) v_jᵀ
    chunk_decay = jnp.exp(jnp.sum(w_c, axis=3))                     # [B, H, nC, N]
    k_end = k_c * jnp.exp(jnp.flip(_exclusive_cumsum(jnp.flip(w_c, 3), axis=3), 3))
    kv_c = jnp.einsum("bhcji,bhcjn->bhcin", k_end, v_c)            # [B, H, nC, N, N]

    def body(S, x_c):
        decay, kv = x_c
        return decay[..., None] * S + kv, S

    xs = (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(kv_c, 2, 0))
    state, S_before = jax.lax.scan(body, state, xs)                # S_before: [nC, B, H, N, N]
    r_start = r_c * jnp.exp(_exclusive_cumsum(w_c, axis=3))         # r_t ⊙ e^{D(-1, t)}
    y = y + jnp.einsum("bhcti,cbhin->bhctn", r_start, S_before)

    y = y.transpose(0, 2, 3, 1, 4).reshape(B, n_chunks * L, H, N)[:, :T]
    return y.astype(out_dtype), state


def _combine(left, right):
    """Associative operator on segments ``(a, b)``: total log decay a [.., N] and the state
    ``b`` [.., N, N] the segment builds from zero. The left state decays across the right."""
    a1, b1 = left
    a2, b2 = right
    return a1 + a2, jnp.exp(a2)[..., None] * b1 + b2


def wkv6_associative(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
                     state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Parallel form: inclusive ``lax.associative_scan`` over T. Short sequences only.

    Token t is the segment ``(w_t, k_t v_tᵀ)``; the scan gives the state after each token
    from zero, the initial state is folded in on the left (it decays by the scanned ``a``),
    and the state before token t (shifted by one) gives y as in :func:`wkv6_step`.
    It materialises a [B, T, H, N, N] fp32 state (O(T·N²) memory, several copies during
    the scan and its gradient); use :func:`wkv6_chunked` for long sequences.
    """
    out_dtype = v.dtype
    r, w, k, v, u, S0 = _prepare(r, w, k, v, u, state)
    kv = k[..., None] * v[..., None, :]                             # [B, T, H, N, N]
    a, b = jax.lax.associative_scan(_combine, (w, kv), axis=1)
    # fold the initial state in on the left: (0, S0) ⊕ (a_t, b_t)
    _, S_after = _combine((jnp.zeros_like(a), S0[:, None]), (a, b))
    S_prev = jnp.concatenate([S0[:, None], S_after[:, :-1]], axis=1)
    bonus = jnp.sum(r * u[None, None] * k, axis=-1, keepdims=True)
    y = bonus * v + jnp.einsum("bthi,bthij->bthj", r, S_prev)
    return y.astype(out_dtype), S_after[:, -1]


_FORMS = {WkvImpl.SCAN: wkv6_scan, WkvImpl.CHUNKED: wkv6_chunked,
          WkvImpl.ASSOCIATIVE: wkv6_associative}


def wkv6(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
         state: jax.Array | None = None, *, impl: WkvImpl | str = WkvImpl.AUTO,
         chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """RWKV-5/6 WKV through the form ``impl`` names (AUTO: by platform). See module docstring.

    ``chunk_size`` is used by the chunked form only.
    """
    form = resolve_impl(impl, "wkv6", SUPPORTED)
    if form is WkvImpl.CHUNKED:
        return wkv6_chunked(r, w, k, v, u, state, chunk_size=chunk_size)
    return _FORMS[form](r, w, k, v, u, state)
