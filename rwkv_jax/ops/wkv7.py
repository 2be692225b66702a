"""RWKV-7 WKV ("Goose", generalised delta rule): every form side by side, one signature.

Legend (shapes): B batch, T time, H heads, N head size (64 in released models), C chunk.
  r  [B, T, H, N]  receptance (the query)
  w  [B, T, H, N]  *log* decay per step, < 0; the model computes ``w = -e^{-0.5}·σ(w_lin)``,
                   so ``w ∈ (-0.6065, 0)`` (reference §5.1)
  k, v             keys, values [B, T, H, N]
  a, b             the low-rank transition vectors [B, T, H, N]; the model passes
                   ``a = -kk``, ``b = kk ⊙ a_iclr`` with ``kk`` L2-normalised per head
  S  [B, H, N, N]  float32 state per head in the official **[value i, key j]** layout
                   (pip / CUDA); flash-linear-attention stores the transpose, see
                   :func:`state_to_fla` / :func:`state_from_fla`
  resets [B, T]    optional bool document starts (below)

Per token (reference §5.1, the CUDA kernel's loop, thread = value row i)::

    sa[i]   = Σ_j S[i,j]·a[j]                               # with the OLD S
    S[i,j] ← S[i,j]·e^{w[j]} + sa[i]·b[j] + v[i]·k[j]       # S(diag(e^w) + a bᵀ) + v kᵀ
    y[i]    = Σ_j S[i,j]·r[j]                               # read AFTER the update

All forms take ``(r, w, k, v, a, b, state=None, *, resets=None)`` and return
``(y [B, T, H, N], final_state [B, H, N, N] float32)``; ``state=None`` means zeros. Inputs
may be any float dtype; everything is computed in fp32 and ``y`` is returned in the dtype of
``v``. A sequence can be split anywhere: the prefix's final state fed to the rest equals one
call.

Packed documents: ``resets[b, t] = True`` means token t of row b starts a new document:
before token t is processed, the carried state of row b is replaced by the empty (zero)
state. A reset at t = 0 discards the ``state`` passed in (its gradient is then exactly zero).
Outputs at and after t, and the final state, equal running that document alone from the
zero state. ``resets=None`` traces exactly the computation without resets (no extra cost).

Every public form is jitted by :func:`~rwkv_jax.ops.impl.jit_form` (``chunk_size``
static): an eager call compiles once per shape/dtype/configuration (and ``resets`` given
or not), however the call is spelled; inside an outer jit or grad it is inlined.

Forms:
  * :func:`wkv7_step`     one token, the per-token update above;
  * :func:`wkv7_scan`     ``lax.scan`` of the step over T (the oracle);
  * :func:`wkv7_chunked`  the WY / DPLR chunked form of reference §5.4: intra-chunk
                          matrices, a unit-lower-triangular inverse, and a ``lax.scan`` that only
                          carries the state across chunks;
  * ``WkvImpl.PALLAS``    the chunked Pallas kernels of :mod:`rwkv_jax.kernels.wkv7`
                          (imported on first use; never picked by AUTO);
  * :func:`wkv7`          dispatch through :class:`~rwkv_jax.ops.impl.WkvImpl`.

There is no associative-scan form: its combine would be a product of N×N transition
matrices (O(N³) per token pair instead of the recurrence's O(N²) per token), which does not
pay at N = 64; the chunked form is the parallel one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops.impl import WkvImpl, check_resets, form_kwargs, jit_form, resolve_impl

SUPPORTED = (WkvImpl.SCAN, WkvImpl.CHUNKED, WkvImpl.PALLAS)

# Chunk length of the chunked form. The intra-chunk terms cost O(T·C·N) exps (one C×C×N
# exponent tensor per chunk), so smaller is cheaper: on CPU at B=8, T=512, H=8, N=64
# (benchmarks/bench_wkv7.py) fwd+bwd took 1.1x / 1.7x / 2.7x the lax.scan time for
# C = 16 / 32 / 64 (forward alone: 8x / 15x / 24x). All are accurate to ~3e-7 in fp32.
DEFAULT_CHUNK = 16

# fp32 matmuls at full precision: GPUs otherwise default to TF32 (10-bit mantissa) for fp32
# dots, which the fp32 state cannot afford over long sequences.
_HI = jax.lax.Precision.HIGHEST


def state_to_fla(S: jax.Array) -> jax.Array:
    """Official [..., value, key] state -> flash-linear-attention's [..., key, value]."""
    return jnp.swapaxes(S, -1, -2)


def state_from_fla(S: jax.Array) -> jax.Array:
    """flash-linear-attention's [..., key, value] state -> the official [..., value, key]."""
    return jnp.swapaxes(S, -1, -2)


def _prepare(r, w, k, v, a, b, state, resets):
    """fp32 casts, the zero state for None, resets as bool [B, T] (or None)."""
    B, T, H, N = r.shape
    if state is None:
        state = jnp.zeros((B, H, N, N), jnp.float32)
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    return (*(f32(x) for x in (r, w, k, v, a, b)), f32(state), check_resets(resets, B, T))


@jit_form
def wkv7_step(r_t: jax.Array, w_t: jax.Array, k_t: jax.Array, v_t: jax.Array,
              a_t: jax.Array, b_t: jax.Array, S: jax.Array,
              reset_t: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One token. ``r_t … b_t``: [B, H, N] (any float dtype); ``S``: [B, H, N, N] [value, key];
    ``reset_t``: optional bool [B], where True ``S`` is zeroed before the token (a document
    starts at it).

    Returns ``(y_t [B, H, N] in v_t's dtype, new S [B, H, N, N] float32)``.
    """
    out_dtype = v_t.dtype
    r_t, w_t, k_t, v_t, a_t, b_t, S = (x.astype(jnp.float32)
                                       for x in (r_t, w_t, k_t, v_t, a_t, b_t, S))
    if reset_t is not None:
        S = jnp.where(jnp.asarray(reset_t, jnp.bool_)[:, None, None, None], 0.0, S)
    sa = jnp.einsum("bhij,bhj->bhi", S, a_t, precision=_HI)
    S = (S * jnp.exp(w_t)[:, :, None, :] + sa[..., :, None] * b_t[:, :, None, :]
         + v_t[..., :, None] * k_t[:, :, None, :])
    y_t = jnp.einsum("bhij,bhj->bhi", S, r_t, precision=_HI)
    return y_t.astype(out_dtype), S


@jit_form
def wkv7_scan(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
              b: jax.Array, state: jax.Array | None = None, *,
              resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sequential form: ``lax.scan`` of :func:`wkv7_step` over T. Shapes and ``resets`` as
    the module docstring."""
    out_dtype = v.dtype
    *xs, S, resets = _prepare(r, w, k, v, a, b, state, resets)

    def body(S, x_t):
        *x_t, reset_t = x_t
        y_t, S = wkv7_step(*x_t, S, reset_t)
        return S, y_t

    # time-major [T, B, H, N] (resets [T, B])
    xs = tuple(None if x is None else jnp.swapaxes(x, 0, 1) for x in (*xs, resets))
    S, y = jax.lax.scan(body, S, xs)
    return jnp.swapaxes(y, 0, 1).astype(out_dtype), S


def _masked_exp(x, mask):
    """``exp(x)`` where ``mask``, exactly 0 elsewhere, with no inf/NaN in value or gradient.

    The mask goes on the exponent (the unselected entries, ``G_i - G_j > 0`` for j > i, would
    overflow for strong decays), and a second ``where`` zeroes the unselected entries of the
    input so that their cotangent is never formed from an overflowed value.
    """
    safe = jnp.where(mask, x, 0.0)
    return jnp.exp(jnp.where(mask, safe, -jnp.inf))


def _unit_lower_inverse(L):
    """``(I - L)^{-1}`` for strictly lower-triangular ``L`` [..., C, C], by repeated squaring.

    ``L`` is nilpotent (``L^C = 0``), so ``(I - L)^{-1} = Σ_{m<C} L^m
    = (I + L)(I + L²)(I + L⁴)…``: ⌈log2 C⌉ pairs of small matmuls. Exact like a triangular
    solve, but batched matmuls; XLA's CPU ``triangular_solve`` over thousands of 16×16 blocks
    measured ~50x slower, and a row-by-row forward substitution ~5x slower in the backward.
    """
    C = L.shape[-1]
    eye = jnp.eye(C, dtype=L.dtype).reshape((1,) * (L.ndim - 2) + (C, C))
    inv, P, span = eye + L, L, 2                      # inv = Σ_{m<span} L^m
    while span < C:
        P = jnp.matmul(P, P, precision=_HI)
        inv = inv + jnp.matmul(inv, P, precision=_HI)
        span *= 2
    return inv


@jit_form(static_argnames=("chunk_size",))
def wkv7_chunked(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
                 b: jax.Array, state: jax.Array | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK,
                 resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Chunked WY / DPLR form (reference §5.4); shapes as the module legend.

    Works in the transposed [key, value] state ``Z = Sᵀ`` that §5.4 is written for. Within a
    chunk with start state ``Z0``, ``G`` the inclusive cumulative log-decay and ``G⁻`` the
    exclusive one (``G⁻_i = G_{i-1}``, ``G⁻_0 = 0``)::

        A_qk[i,j] = Σ_d r_i k_j e^{G_i - G_j}  (j ≤ i)   A_qb: same with b_j
        A_ak[i,j] = Σ_d a_i k_j e^{G⁻_i - G_j} (j < i)   A_ab: same with b_j
        sa    = (I - A_ab)^{-1} (A_ak V + (a ⊙ e^{G⁻}) Z0)         # sa_i = a_iᵀ Z_{i-1}
        Y     = A_qk V + A_qb sa + (r ⊙ e^{G}) Z0
        Z_end = e^{G_last} ⊙ Z0 + (k ⊙ e^{G_last - G})ᵀ V + (b ⊙ e^{G_last - G})ᵀ sa

    Every exponent is ≤ 0. All chunk-local terms are computed for all chunks at once; the
    ``lax.scan`` over chunks carries only ``Z``. T need not be a multiple of ``chunk_size``:
    the tail is padded with ``w = 0`` and ``r = k = v = a = b = 0``, which leave the state
    unchanged, so the final state is the one after the last real token.

    With ``resets``, every term keeps only what one document sees, inside the chunk: the
    four pair matrices drop the pairs (j -> i) with a reset in (j, i] (after the sum over
    d, so the exponents are the ones above), ``Z0`` reaches only the tokens before the
    chunk's first reset, and only the chunk's last document reaches ``Z_end`` (none of
    ``Z0`` if the chunk has a reset). ``(I - A_ab)`` stays unit lower triangular.

    """
    out_dtype = v.dtype
    *xs, S, resets = _prepare(r, w, k, v, a, b, state, resets)
    B, T, H, N = xs[0].shape
    C = int(chunk_size)
    if C < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    nC = -(-T // C)
    pad = nC * C - T

    def to_chunks(x):  # [B, T, H, N] -> [B, H, nC, C, N]
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, nC, C, H, N).transpose(0, 3, 1, 2, 4)

    r, w, k, v, a, b = (to_chunks(x) for x in xs)

    # cumulative log-decay inside each chunk, fp32 (a sum of ≤ C terms ≥ -0.6065 each)
    G = jnp.cumsum(w, axis=-2)
    Gl = G[..., -1:, :]                          # whole-chunk decay [B, H, nC, 1, N]
    # exclusive cumsum (decay before token i): G⁻_i = G_{i-1}, G⁻_0 = 0
    Gm = jnp.concatenate([jnp.zeros_like(Gl), G[..., :-1, :]], axis=-2)

    i = jnp.arange(C)
    incl = (i[:, None] >= i[None, :])[None, None, None, :, :, None]  # [1,1,1,C,C,1]
    # [B, H, nC, C_i, C_j, N]; masked on the exponent so the upper triangle is exactly 0
    E_incl = _masked_exp(G[..., :, None, :] - G[..., None, :, :], incl)
    # strict: e^{G⁻_i - G_j} (j < i) is row i-1 of E_incl, and row 0 is empty; a shift
    # instead of a second C×C×N exp
    E_strict = jnp.concatenate([jnp.zeros_like(E_incl[..., :1, :, :]),
                                E_incl[..., :-1, :, :]], axis=-3)

    def pair(x, E, y):  # Σ_d x_i y_j E[i,j,d] -> [..., C_i, C_j]
        return jnp.sum(x[..., :, None, :] * E * y[..., None, :, :], axis=-1)

    A_qk, A_qb = pair(r, E_incl, k), pair(r, E_incl, b)
    A_ak, A_ab = pair(a, E_strict, k), pair(a, E_strict, b)
    a_start, r_start = a * jnp.exp(Gm), r * jnp.exp(G)  # the rows that read Z0
    k_end = k * jnp.exp(Gl - G)                        # decay from token j to chunk end
    b_end = b * jnp.exp(Gl - G)
    decay = jnp.exp(Gl)                                # [B, H, nC, 1, N_k]
    if resets is not None:
        rs = jnp.pad(resets, ((0, 0), (0, pad))).reshape(B, 1, nC, C)
        seg = jnp.cumsum(rs.astype(jnp.int32), axis=-1)    # document number inside the chunk
        same_doc = seg[..., :, None] == seg[..., None, :]  # [B, 1, nC, C_i, C_j]
        A_qk, A_qb, A_ak, A_ab = (jnp.where(same_doc, A, 0.0)
                                  for A in (A_qk, A_qb, A_ak, A_ab))
        first, last = (seg == 0)[..., None], (seg == seg[..., -1:])[..., None]
        a_start, r_start = jnp.where(first, a_start, 0.0), jnp.where(first, r_start, 0.0)
        k_end, b_end = jnp.where(last, k_end, 0.0), jnp.where(last, b_end, 0.0)
        decay = jnp.where((seg[..., -1:] > 0)[..., None], 0.0, decay)

    mm = lambda x, y: jnp.matmul(x, y, precision=_HI)  # noqa: E731
    # (I - A_ab)^{-1} applied to both right-hand sides at once: sa = U + W @ Z0
    rhs = jnp.concatenate([mm(A_ak, v), a_start], axis=-1)
    UW = mm(_unit_lower_inverse(A_ab), rhs)
    U, W = UW[..., :N], UW[..., N:]                    # [.., C, N_v], [.., C, N_k]
    Z_in = mm(jnp.swapaxes(k_end, -1, -2), v)          # this chunk's kᵀV [.., N_k, N_v]

    def body(Z, xs_c):
        # Z: [B, H, N_k, N_v]; xs_c: one chunk of each chunk-local term
        U_c, W_c, b_end_c, Z_in_c, decay_c = xs_c
        sa = U_c + mm(W_c, Z)
        Z_next = (jnp.swapaxes(decay_c, -1, -2) * Z + Z_in_c
                  + mm(jnp.swapaxes(b_end_c, -1, -2), sa))
        return Z_next, Z

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
    Z, Z0 = jax.lax.scan(body, state_to_fla(S),
                         tuple(chunk_major(x) for x in (U, W, b_end, Z_in, decay)))
    Z0 = jnp.moveaxis(Z0, 0, 2)                        # start state per chunk [B, H, nC, K, V]

    sa = U + mm(W, Z0)
    y = mm(A_qk, v) + mm(A_qb, sa) + mm(r_start, Z0)             # [B, H, nC, C, N_v]
    y = y.transpose(0, 2, 3, 1, 4).reshape(B, nC * C, H, N)[:, :T]
    return y.astype(out_dtype), state_from_fla(Z)


def _pallas(*args, **kwargs):
    """``WkvImpl.PALLAS``: :func:`rwkv_jax.kernels.wkv7.wkv7_pallas`, imported on first use
    (the kernels are optional)."""
    try:
        from rwkv_jax.kernels.wkv7 import wkv7_pallas
    except ImportError as e:
        raise NotImplementedError(f"wkv7 'pallas' form unavailable: {e}") from None
    return wkv7_pallas(*args, **kwargs)


_FORMS = {WkvImpl.SCAN: wkv7_scan, WkvImpl.CHUNKED: wkv7_chunked, WkvImpl.PALLAS: _pallas}


def wkv7(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array, b: jax.Array,
         state: jax.Array | None = None, *, impl: WkvImpl | str = WkvImpl.AUTO,
         chunk_size: int = DEFAULT_CHUNK,
         resets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 WKV through the form ``impl`` names (AUTO: by platform). See module docstring.

    ``chunk_size`` is used by the chunked form only. ``impl`` is resolved here, in Python,
    and the (jitted) form is called: an eager call compiles once per shape, and the traced
    program is exactly the form's.
    """
    form = resolve_impl(impl, "wkv7", SUPPORTED)
    kwargs = form_kwargs(form, resets=resets, chunk_size=chunk_size)
    return _FORMS[form](r, w, k, v, a, b, state, **kwargs)
