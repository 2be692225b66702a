"""RWKV-5/6 WKV: matrix state with diagonal decay, every form side by side, one signature.

Legend (shapes): B batch, T time, H heads, N head size (key and value channels alike).
  r, k, v  [B, T, H, N]  receptance, key, value (any float dtype; computed in fp32)
  w        [B, T, H, N]  LOG decay per step, ``w = -exp(w_raw) <= 0``; anything broadcastable
                         to [B, T, H, N] (RWKV-5 passes its per-(head, key) decay as [H, N])
  u        [H, N]        bonus for the current token, linear (``time_faaaa``)
  S        [B, H, N, N]  float32 state per head, indexed [key i, value j] (pip / FLA layout)
  resets   [B, T]        optional bool document starts (below)

Per head, at step t (reference §3.1, §4.1)::

    y_t[j] = Σ_i r_t[i]·( u[i]·k_t[i]·v_t[j] + S[i, j] )
    S[i, j] <- exp(w_t[i])·S[i, j] + k_t[i]·v_t[j]

All forms take ``(r, w, k, v, u, state=None, *, resets=None)`` and return
``(y [B, T, H, N], final_state)``; ``state=None`` means the zero state. Accumulation is fp32
whatever the input dtype, the state stays fp32 and ``y`` is returned in the dtype of ``v``.
A sequence can be split anywhere: running the prefix and feeding its final state to the
rest equals one call. RWKV-5 is the special case of a decay that is constant over time.

Packed documents: ``resets[b, t] = True`` means token t of row b starts a new document:
before token t is processed, the carried state of row b is replaced by the empty (zero)
state. A reset at t = 0 discards the ``state`` passed in (its gradient is then exactly zero).
Outputs at and after t, and the final state, equal running that document alone from the
zero state. ``resets=None`` traces exactly the computation without resets (no extra cost).

Every public form is jitted by :func:`~rwkv_jax.ops.impl.jit_form` (``chunk_size``
static): an eager call compiles once per shape/dtype/configuration (and ``resets`` given
or not), however the call is spelled; inside an outer jit or grad it is inlined.

Forms:
  * :func:`wkv6_step`         one token;
  * :func:`wkv6_scan`         ``lax.scan`` of the step over T (the oracle);
  * :func:`wkv6_chunked`      intra-chunk matmuls plus a scan over chunks (reference §4.3);
  * :func:`wkv6_associative`  ``lax.associative_scan`` over (decay, outer product) pairs,
                              segmented at resets; materialises one N×N state per token, so
                              short sequences only;
  * ``WkvImpl.PALLAS``        the chunked Pallas kernels of :mod:`rwkv_jax.kernels.wkv6`
                              (imported on first use; never picked by AUTO);
  * :func:`wkv6`              dispatch through :class:`~rwkv_jax.ops.impl.WkvImpl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops.impl import WkvImpl, check_resets, form_kwargs, jit_form, resolve_impl

SUPPORTED = (WkvImpl.SCAN, WkvImpl.CHUNKED, WkvImpl.ASSOCIATIVE, WkvImpl.PALLAS)

# Sub-chunk length of the chunked form (FLA's BC). Exponent tensors of the diagonal blocks
# cost chunk_size·SUB_CHUNK·N per chunk, so this stays small.
SUB_CHUNK = 16

# fp32 contractions at full fp32 precision: JAX's DEFAULT precision runs fp32 matmuls as TF32
# on recent GPUs and as bf16 passes on TPU (~1e-3 relative), which would break "accumulate
# in fp32" for every form here. CPU is unaffected.
_PRECISION = jax.lax.Precision.HIGHEST

# Per-step log decays are clamped here so that every sum of them stays finite (no -inf, so
# no inf - inf = NaN in exponents or gradients). exp(-1e4) is 0 in fp32, as is exp(-inf):
# values and gradients are unchanged.
LOG_DECAY_MIN = -1e4


def _prepare(r, w, k, v, u, state, resets):
    """Cast to fp32, broadcast ``w`` to ``k``'s shape, check shapes, build the zero state,
    resets as bool [B, T] (or None)."""
    if not (r.shape == k.shape == v.shape) or k.ndim != 4:
        raise ValueError(f"r, k, v must share one [B, T, H, N] shape; got "
                         f"{r.shape}, {k.shape}, {v.shape}")
    B, T, H, N = k.shape
    if tuple(jnp.shape(u)) != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}; got {tuple(jnp.shape(u))}")
    if state is None:
        state = jnp.zeros((B, H, N, N), jnp.float32)
    if tuple(jnp.shape(state)) != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = {(B, H, N, N)}; "
                         f"got {tuple(jnp.shape(state))}")
    w = jnp.maximum(jnp.broadcast_to(jnp.asarray(w, jnp.float32), k.shape), LOG_DECAY_MIN)
    return (r.astype(jnp.float32), w, k.astype(jnp.float32), v.astype(jnp.float32),
            jnp.asarray(u, jnp.float32), jnp.asarray(state, jnp.float32),
            check_resets(resets, B, T))


@jit_form
def wkv6_step(r_t: jax.Array, w_t: jax.Array, k_t: jax.Array, v_t: jax.Array, u: jax.Array,
              S: jax.Array, reset_t: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One token. ``r_t, k_t, v_t``: [B, H, N]; ``w_t`` log decay broadcastable to [B, H, N];
    ``u``: [H, N]; ``S``: [B, H, N, N] float32 [key, value]; ``reset_t``: optional bool [B],
    where True ``S`` is zeroed before the token (a document starts at it).

    Computes in fp32 and returns ``(y_t [B, H, N] in v_t's dtype, new S float32)``.
    """
    out_dtype = v_t.dtype
    r_t, k_t, v_t = (x.astype(jnp.float32) for x in (r_t, k_t, v_t))
    w_t = jnp.maximum(jnp.broadcast_to(jnp.asarray(w_t, jnp.float32), k_t.shape), LOG_DECAY_MIN)
    u = jnp.asarray(u, jnp.float32)
    S = jnp.asarray(S, jnp.float32)
    if reset_t is not None:
        S = jnp.where(jnp.asarray(reset_t, jnp.bool_)[:, None, None, None], 0.0, S)
    # y_j = (Σ_i r_i u_i k_i)·v_j + Σ_i r_i S_ij
    bonus = jnp.sum(r_t * u[None] * k_t, axis=-1, keepdims=True)
    y = bonus * v_t + jnp.einsum("bhi,bhij->bhj", r_t, S, precision=_PRECISION)
    S = jnp.exp(w_t)[..., None] * S + k_t[..., None] * v_t[..., None, :]
    return y.astype(out_dtype), S


@jit_form
def wkv6_scan(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
              state: jax.Array | None = None, *,
              resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sequential form: ``lax.scan`` of :func:`wkv6_step` over T. Shapes and ``resets`` as
    the module docstring."""
    out_dtype = v.dtype
    r, w, k, v, u, state, resets = _prepare(r, w, k, v, u, state, resets)

    def body(S, x_t):
        r_t, w_t, k_t, v_t, reset_t = x_t
        y_t, S = wkv6_step(r_t, w_t, k_t, v_t, u, S, reset_t)
        return S, y_t

    # time-major [T, B, H, N] (resets [T, B])
    xs = tuple(None if x is None else jnp.swapaxes(x, 0, 1) for x in (r, w, k, v, resets))
    state, y = jax.lax.scan(body, state, xs)
    return jnp.swapaxes(y, 0, 1).astype(out_dtype), state


def _exclusive_cumsum(x, axis, reverse=False):
    """Σ over earlier positions along ``axis`` (later ones if ``reverse``), 0 at the first.

    Not ``cumsum(x) - x``: that subtraction cancels, and an error δ in a log decay is a
    relative error δ in its factor."""
    n = x.shape[axis]
    c = jax.lax.cumsum(x, axis=axis, reverse=reverse)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    if reverse:
        return jnp.concatenate([jax.lax.slice_in_dim(c, 1, n, axis=axis), zero], axis=axis)
    return jnp.concatenate([zero, jax.lax.slice_in_dim(c, 0, n - 1, axis=axis)], axis=axis)


@jit_form(static_argnames=("chunk_size",))
def wkv6_chunked(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
                 state: jax.Array | None = None, *, chunk_size: int = 64,
                 resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Chunked form (reference §4.3): intra-chunk matmuls, a ``lax.scan`` over chunks for S.

    Within a chunk with start state S0, with every log-decay sum taken over the tokens
    strictly between the two positions involved (``D(a, b) = Σ_{a<m<b} w_m <= 0``)::

        y_t   = Σ_i r_t,i e^{D(-1, t)_i} S0_i  +  Σ_{j<t} [Σ_i r_t,i k_j,i e^{D(j, t)_i}] v_j
                + (Σ_i r_t,i u_i k_t,i) v_t
        S_end = e^{D(-1, L)} ⊙ S0  +  Σ_j (k_j ⊙ e^{D(j, L)}) v_jᵀ

    Chunks are split into sub-chunks of :data:`SUB_CHUNK`. For a query sub-chunk starting at
    ``p`` and a key ``j < p`` the factor splits at the reference point ``p``:
    ``e^{D(j,t)} = e^{D(p-1, t)}·e^{D(j, p)}`` with both exponents <= 0, so the block is a
    matmul of ``r·e^{..}`` and ``k·e^{..}`` that can neither overflow nor lose a term that
    matters (if a factor underflows, so does the product). Diagonal sub-chunks are
    element-wise with exponents masked to -inf before ``exp``.

    Every ``D`` is summed directly from the log decays it spans (prefix or suffix sums of the
    decays, masked to the span), never as a difference of two cumulative sums: with
    per-token decays down to ~-150 such a difference cancels and its fp32 error (~ulp of
    the chunk total) becomes the relative error of terms of order 1.

    With ``resets``, every term keeps only what one document sees, inside the chunk: a pair
    (j -> t) with a reset in (j, t] is dropped (after the sum over i, so the exponents stay
    the ones above, all <= 0), S0 reaches only the tokens before the chunk's first reset,
    and only the tokens of the chunk's last document reach S_end (none of S0 if the chunk
    has a reset).

    T need not be a multiple of ``chunk_size``: the tail is padded with r = k = v = 0 and
    w = 0, which leaves the state unchanged, and cut off. ``chunk_size`` must be a multiple
    of :data:`SUB_CHUNK` or smaller than it. Chunk-local terms are computed for all chunks
    at once on a leading axis G = (chunk, batch, head), so no array has more than five axes
    (jaxlib 0.10.2 / 0.11.0 XLA:CPU crashes on some rank-7 reductions, jax-ml/jax#40412).

    """
    out_dtype = v.dtype
    r, w, k, v, u, state, resets = _prepare(r, w, k, v, u, state, resets)
    B, T, H, N = k.shape
    L = chunk_size
    s = min(SUB_CHUNK, L)
    if L < 1 or L % s:
        raise ValueError(f"chunk_size must be positive and a multiple of {SUB_CHUNK} "
                         f"(or smaller than it); got {chunk_size}")
    n_sub = L // s
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    G = n_chunks * B * H

    def to_chunks(x):  # [B, T, H, N] -> [G, L, N], G = (chunk, batch, head) chunk-major
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, n_chunks, L, H, N).transpose(1, 0, 3, 2, 4).reshape(G, L, N)

    r_c, w_c, k_c, v_c = (to_chunks(x) for x in (r, w, k, v))
    # sub-chunk view [G, a, s, N]: sub-chunk a, position t inside it
    r_s, w_s, k_s, v_s = (x.reshape(G, n_sub, s, N) for x in (r_c, w_c, k_c, v_c))
    if resets is not None:
        rs = jnp.pad(resets, ((0, 0), (0, pad))).reshape(B, n_chunks, L).transpose(1, 0, 2)
        rs = jnp.broadcast_to(rs[:, :, None], (n_chunks, B, H, L)).reshape(G, L)
        seg = jnp.cumsum(rs.astype(jnp.int32), axis=1)  # document number inside the chunk

    # ---- inter-sub-chunk blocks: query sub-chunk a (start a·s), keys j < a·s of the chunk
    # D(a·s - 1, t) for t in sub-chunk a: exclusive prefix inside the sub-chunk
    q_til = r_s * jnp.exp(_exclusive_cumsum(w_s, axis=2))           # [G, a, s, N]
    # D(j, a·s) = Σ_{j<m<a·s} w_m, for every a and every key position j of the chunk
    # = suffix sum (exclusive) over j of the decays with positions before a·s kept
    start = jnp.arange(n_sub) * s
    key_before = (jnp.arange(L)[None, :] < start[:, None])[None, :, :, None]  # [1, a, L, 1]
    w_before = jnp.where(key_before, w_c[:, None], 0.0)             # [G, a, L, N]
    k_exp = _exclusive_cumsum(w_before, axis=2, reverse=True)
    # mask before exp: a masked exponent may be anything, its factor must be exactly 0
    k_til = k_c[:, None] * jnp.exp(jnp.where(key_before, k_exp, -jnp.inf))
    A_inter = jnp.einsum("gatn,gajn->gatj", q_til, k_til,
                         precision=_PRECISION)                      # [G, a, s, L]
    if resets is not None:  # pairs (j -> t) inside one document only
        same_doc = seg[:, :, None] == seg[:, None, :]                # [G, L_t, L_j]
        A_inter = jnp.where(same_doc.reshape(G, n_sub, s, L), A_inter, 0.0)
    y = jnp.einsum("gatj,gjn->gatn", A_inter, v_c, precision=_PRECISION)

    # ---- diagonal sub-chunks: D(j, t) for j < t inside the sub-chunk, element-wise
    # = suffix sum (exclusive) over j of the decays with positions before t kept
    pos = jnp.arange(s)
    causal = (pos[None, :] < pos[:, None])[None, None, :, :, None]  # [1, 1, t, j, 1]
    w_before = jnp.where(causal, w_s[:, :, None], 0.0)              # [G, a, t, m, N]
    d_exp = _exclusive_cumsum(w_before, axis=3, reverse=True)
    # product and sum written out so XLA fuses exp into the reduction (a 3-operand einsum
    # materialises the [.., s, s, N] products)
    A_diag = jnp.sum(r_s[:, :, :, None] * k_s[:, :, None]
                     * jnp.exp(jnp.where(causal, d_exp, -jnp.inf)), axis=-1)  # [G, a, t, j]
    if resets is not None:
        seg_s = seg.reshape(G, n_sub, s)
        A_diag = jnp.where(seg_s[..., :, None] == seg_s[..., None, :], A_diag, 0.0)
    y = y + jnp.einsum("gatj,gajn->gatn", A_diag, v_s, precision=_PRECISION)
    # the current token's bonus: (Σ_i r_i u_i k_i)·v_t
    u_g = jnp.broadcast_to(u, (n_chunks * B, H, N)).reshape(G, 1, 1, N)
    bonus = jnp.sum(r_s * u_g * k_s, axis=-1, keepdims=True)
    y = (y + bonus * v_s).reshape(G, L, N)

    # ---- across chunks: S_end = e^{D(-1, L)} ⊙ S0 + Σ_j (k_j ⊙ e^{D(j, L)}) v_jᵀ
    chunk_decay = jnp.exp(jnp.sum(w_c, axis=1))                     # [G, N]
    k_end = k_c * jnp.exp(_exclusive_cumsum(w_c, axis=1, reverse=True))
    r_start = r_c * jnp.exp(_exclusive_cumsum(w_c, axis=1))         # r_t ⊙ e^{D(-1, t)}
    if resets is not None:
        chunk_decay = jnp.where(seg[:, -1:] > 0, 0.0, chunk_decay)  # S0 cut inside the chunk
        k_end = jnp.where((seg == seg[:, -1:])[..., None], k_end, 0.0)  # the last document
        r_start = jnp.where((seg == 0)[..., None], r_start, 0.0)    # before the first reset
    kv_c = jnp.einsum("gji,gjn->gin", k_end, v_c, precision=_PRECISION)  # [G, N, N]

    def body(S, x_c):
        decay, kv = x_c
        return decay[..., None] * S + kv, S

    xs = (chunk_decay.reshape(n_chunks, B, H, N), kv_c.reshape(n_chunks, B, H, N, N))
    state, S_before = jax.lax.scan(body, state, xs)                # S_before: [nC, B, H, N, N]
    y = y + jnp.einsum("gti,gin->gtn", r_start, S_before.reshape(G, N, N),
                       precision=_PRECISION)

    y = y.reshape(n_chunks, B, H, L, N).transpose(1, 0, 3, 2, 4)
    y = y.reshape(B, n_chunks * L, H, N)[:, :T]
    return y.astype(out_dtype), state


def _combine(left, right):
    """Associative operator on segments ``(a, b[, f])``: total log decay a [.., N], the state
    ``b`` [.., N, N] the segment builds from zero, and with resets a flag ``f``: the segment
    contains a document start. The left state decays across the right one, and is dropped
    if a document starts in it (a segmented scan)."""
    a1, b1, *f1 = left
    a2, b2, *f2 = right
    decay = jnp.exp(a2)
    if f2:
        decay = jnp.where(f2[0], 0.0, decay)
    out = (a1 + a2, decay[..., None] * b1 + b2)
    return out + ((f1[0] | f2[0],) if f2 else ())


@jit_form
def wkv6_associative(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
                     state: jax.Array | None = None, *,
                     resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Parallel form: inclusive ``lax.associative_scan`` over T. Short sequences only.

    Token t is the segment ``(w_t, k_t v_tᵀ)`` (flagged when a document starts at it); the
    initial state enters as a leading segment ``(0, S0)``, so the T + 1 scanned states are
    the state before each token followed by the final state, and y follows as in
    :func:`wkv6_step` (from the zero state where a document starts). It materialises
    [B, T + 1, H, N, N] fp32 states (O(T·N²) memory, several copies during the scan and its
    gradient) where the other forms keep one per sequence or chunk; use
    :func:`wkv6_chunked` for long sequences.
    """
    out_dtype = v.dtype
    r, w, k, v, u, S0, resets = _prepare(r, w, k, v, u, state, resets)
    B, T = k.shape[:2]
    a = jnp.concatenate([jnp.zeros_like(w[:, :1]), w], axis=1)
    b = jnp.concatenate([S0[:, None], k[..., None] * v[..., None, :]], axis=1)
    f = () if resets is None else (
        jnp.concatenate([jnp.zeros((B, 1), jnp.bool_), resets], axis=1)[:, :, None, None],)
    _, S, *_ = jax.lax.associative_scan(_combine, (a, b, *f), axis=1)  # [B, T + 1, H, N, N]
    S_prev = S[:, :T]
    if resets is not None:
        S_prev = jnp.where(resets[:, :, None, None, None], 0.0, S_prev)
    bonus = jnp.sum(r * u[None, None] * k, axis=-1, keepdims=True)
    y = bonus * v + jnp.einsum("bthi,bthij->bthj", r, S_prev, precision=_PRECISION)
    return y.astype(out_dtype), S[:, T]


def _pallas(*args, **kwargs):
    """``WkvImpl.PALLAS``: :func:`rwkv_jax.kernels.wkv6.wkv6_pallas`, imported on first use
    (the kernels are optional)."""
    try:
        from rwkv_jax.kernels.wkv6 import wkv6_pallas
    except ImportError as e:
        raise NotImplementedError(f"wkv6 'pallas' form unavailable: {e}") from None
    return wkv6_pallas(*args, **kwargs)


_FORMS = {WkvImpl.SCAN: wkv6_scan, WkvImpl.CHUNKED: wkv6_chunked,
          WkvImpl.ASSOCIATIVE: wkv6_associative, WkvImpl.PALLAS: _pallas}


def wkv6(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
         state: jax.Array | None = None, *, impl: WkvImpl | str = WkvImpl.AUTO,
         chunk_size: int = 64, resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """RWKV-5/6 WKV through the form ``impl`` names (AUTO: by platform). See module docstring.

    ``chunk_size`` is used by the chunked form only. ``impl`` is resolved here, in Python,
    and the (jitted) form is called: an eager call compiles once per shape, and the traced
    program is exactly the form's.
    """
    form = resolve_impl(impl, "wkv6", SUPPORTED)
    kwargs = form_kwargs(form, resets=resets, chunk_size=chunk_size)
    return _FORMS[form](r, w, k, v, u, state, **kwargs)
