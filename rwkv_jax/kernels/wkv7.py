"""RWKV-7 WKV as a chunked Pallas kernel pair (forward, backward), same contract as ops.

Legend and contract as :mod:`rwkv_jax.ops.wkv7`: ``r, w, k, v, a, b`` [B, T, H, N] (``w``
the log decay), state [B, H, N, N] float32 in the official [value, key] layout; returns
``(y [B, T, H, N] in v's dtype, final state float32)``. ``resets`` (bool [B, T]): token t
of row b starts a new document (the state before it is replaced by zeros).

Design (one program per (batch, head); chunks of L = ``chunk_size`` tokens, default 16):

  * forward: a loop over chunks carrying the state S [value, key] in registers (TPU: VMEM).
    Per chunk the WY / DPLR form of reference §5.4 (as :func:`~rwkv_jax.ops.wkv7.wkv7_chunked`,
    here in S's layout, so ``Z0 = Sᵀ`` products are ``x @ Sᵀ``)::

        A_qk[i,j] = Σ_d r_i k_j e^{G_i - G_j} (j ≤ i)    A_qb: same with b_j
        A_ak[i,j] = Σ_d a_i k_j e^{G⁻_i - G_j} (j < i)   A_ab: same with b_j
        sa    = (I - A_ab)^{-1} (A_ak V + (a ⊙ e^{G⁻}) Sᵀ)        # sa_i = S_{i-1} a_i
        Y     = A_qk V + A_qb sa + (r ⊙ e^{G}) Sᵀ
        S_end = S ⊙ e^{G_last} + Vᵀ (k ⊙ e^{G_last - G}) + saᵀ (b ⊙ e^{G_last - G})

    with every exponent a log-decay sum over exactly its span (``G_i - G_j`` is
    ``Σ_{j<m≤i} w_m``, taken directly: :func:`~rwkv_jax.kernels.common.span_sums`), all
    ≤ 0. The four L x L matrices are element-wise [L, L, N] exp-products summed over d; the
    unit-lower-triangular inverse is ⌈log2 L⌉ squarings of L x L matmuls. Resets mask every
    pair and state term by document, so a packed row is exactly its documents one by one;
  * the forward also stores S before every chunk (checkpoints, [B, H, T/L, N, N] float32:
    1 GiB at B=8, T=4096, H=32, N=64, L=16, like FLA's per-chunk states);
  * backward: a reverse loop over chunks carrying dL/dS; each chunk is recomputed from its
    checkpoint and differentiated by ``jax.vjp`` of the same chunk function inside the
    kernel (:func:`~rwkv_jax.kernels.common.chunked_recurrence`).

Expected GPU cost (not yet measured; an estimate to check against benchmarks/gpu_check.sh):
per chunk and head ~1.1 M fp32 FMAs (two span-sum matmuls ~0.5 M, four [L, L, N] pair
tensors, ten small matmuls incl. two [L, N] x [N, N] state products and two [N, L] x [L, N]
state updates) and 2 L²N = 32 K exps, on the fp32 "ieee" path (no tensor cores): ~71 K FMAs
and 2 K exps per token and head, ~150 GFLOP per call at B=8, T=4096, H=32, N=64, i.e.
>= 2.2 ms at an H200's ~67 TFLOP/s fp32 with the 256 (b, h) programs busy; the chunk loop
is sequential per program. Guess: 3-5 ms forward, ~3x that forward+backward. H100 peers
(bf16): the official CUDA kernel 4.2 / 11.5 ms, FLA chunk_rwkv7 2.6 / 11.1 ms fwd / fwd+bwd.

Lowerings: Triton on GPU (grid (B, H, 1), N padded to a power of two >= 16), Mosaic on TPU
(head-major layout, time in blocks of ``TPU_BLOCK_T`` tokens on a sequential grid axis),
interpret mode on CPU. See :mod:`rwkv_jax.kernels.common`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops.impl import jit_form
from rwkv_jax.kernels import common
from rwkv_jax.kernels.common import (dot, dot_nt, dot_tn, iota, masked_exp, pair_mask,
                                     prefix_matrix, row, span_sums, suffix_matrix)

FORM = "wkv7 'pallas'"
DEFAULT_CHUNK = 16


def _unit_lower_inverse(A):
    """``(I - A)^{-1}`` for strictly lower-triangular ``A`` [L, L]: ``A`` is nilpotent, so
    the inverse is ``Σ_{m<L} A^m = (I + A)(I + A²)(I + A⁴)…`` (exact, matmuls only)."""
    L = A.shape[0]
    inv = (iota((L, L), 0) == iota((L, L), 1)).astype(jnp.float32) + A
    P, span = A, 2
    while span < L:
        P = dot(P, P)
        inv = inv + dot(inv, P)
        span *= 2
    return inv


def _chunk(xs, hs, S, seg):
    """One chunk: ``xs = (r, w, k, v, a, b)`` [L, N], no head vectors, ``S`` [N_v, N_k],
    ``seg`` [L, N] or None. Returns ``(y [L, N_v], S_end)``."""
    del hs
    r, w, k, v, a, b = xs
    L, N = r.shape
    E_incl = masked_exp(pair_mask(L, N, seg, inclusive=True), span_sums(w, inclusive=True))
    E_strict = masked_exp(pair_mask(L, N, seg, inclusive=False), span_sums(w, inclusive=False))

    def pair(x, E, z):  # Σ_d x_i z_j E[i, j, d]
        return jnp.sum(x[:, None, :] * z[None, :, :] * E, axis=2)

    A_qk, A_qb = pair(r, E_incl, k), pair(r, E_incl, b)
    A_ak, A_ab = pair(a, E_strict, k), pair(a, E_strict, b)
    aG = a * jnp.exp(dot(prefix_matrix(L, strict=True), w))     # a_i ⊙ e^{G⁻_i}
    rG = r * jnp.exp(dot(prefix_matrix(L, strict=False), w))    # r_i ⊙ e^{G_i}
    tail = jnp.exp(dot(suffix_matrix(L), w))                    # e^{G_last - G_j}
    decay = jnp.exp(jnp.sum(w, axis=0, keepdims=True))          # e^{G_last} [1, N_k]
    ke, be = k * tail, b * tail
    if seg is not None:
        last = row(seg, L - 1)
        aG, rG = jnp.where(seg == 0.0, aG, 0.0), jnp.where(seg == 0.0, rG, 0.0)
        ke, be = jnp.where(seg == last, ke, 0.0), jnp.where(seg == last, be, 0.0)
        decay = jnp.where(last == 0.0, decay, 0.0)
    inv = _unit_lower_inverse(A_ab)
    sa = dot(inv, dot(A_ak, v)) + dot_nt(dot(inv, aG), S)        # [L, N_v]
    y = dot(A_qk, v) + dot(A_qb, sa) + dot_nt(rG, S)
    return y, S * decay + dot_tn(v, ke) + dot_tn(sa, be)


_run = common.chunked_recurrence(_chunk, n_seq=6, n_head=0)


@jit_form(static_argnames=("chunk_size", "platform", "interpret"))
def wkv7_pallas(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
                b: jax.Array, state: jax.Array | None = None, *,
                resets: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK,
                platform: str | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 WKV through the chunked Pallas kernels (module docstring); differentiable in
    every input and the initial state.

    Inputs are read in their own dtype (bf16 or fp32); all arithmetic is fp32.
    ``chunk_size``: a power of two >= 16 (Triton's smallest dot). ``platform``: "gpu",
    "tpu" or "cpu" (default: JAX's default backend); ``interpret``: see
    :func:`~rwkv_jax.kernels.common.select_backend`.
    """
    xs = tuple(jnp.asarray(x) for x in (r, w, k, v, a, b))
    shape = xs[0].shape
    if len(shape) != 4 or any(x.shape != shape for x in xs):
        raise ValueError(f"r, w, k, v, a, b must share one [B, T, H, N] shape; got "
                         f"{', '.join(str(x.shape) for x in xs)}")
    B, T, H, N = shape
    if state is None:
        state = jnp.zeros((B, H, N, N), jnp.float32)
    if tuple(jnp.shape(state)) != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = {(B, H, N, N)}; "
                         f"got {tuple(jnp.shape(state))}")
    L = int(chunk_size)
    if L < 16 or L & (L - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    backend = common.select_backend(FORM, platform, interpret)
    state = jnp.asarray(state, jnp.float32)
    if T == 0:
        return jnp.zeros(shape, xs[3].dtype), state
    out_dtype = xs[3].dtype
    xs = tuple(common.kernel_input(x) for x in xs)
    plan = common.make_plan(backend, FORM, T, L, xs[3].dtype)
    n_pad = common.pow2_at_least(N, 16)
    S0 = jnp.pad(state, ((0, 0), (0, 0), (0, n_pad - N), (0, n_pad - N)))
    y, S = _run(plan, common.to_layout(plan, xs, n_pad), (), S0,
                common.resets_to_layout(plan, resets, B, T))
    return common.from_layout(plan, y, T, N).astype(out_dtype), S[:, :, :N, :N]
