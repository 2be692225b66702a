"""RWKV-5/6 WKV as a chunked Pallas kernel pair (forward, backward), same contract as ops.

Legend and contract as :mod:`rwkv_jax.ops.wkv6`: ``r, k, v`` [B, T, H, N], ``w`` log decay
broadcastable to [B, T, H, N], ``u`` [H, N], state [B, H, N, N] float32 [key, value];
returns ``(y [B, T, H, N] in v's dtype, final state float32)``. ``resets`` (bool [B, T]):
token t of row b starts a new document (the state before it is replaced by zeros).

Design (one program per (batch, head); chunks of L = ``chunk_size`` tokens, default 16):

  * forward: a loop over chunks carrying the state S in registers (TPU: VMEM). Per chunk,
    with every log-decay sum taken directly over the span it covers
    (``D(j, t) = Σ_{j<m<t} w_m``; never a difference of cumulative sums, which cancels under
    decays down to -1e4)::

        y_t   = Σ_i r_t,i e^{D(-1,t)_i} S_i  +  Σ_{j<t} A[t, j] v_j  +  (Σ_i r_t,i u_i k_t,i) v_t
        A[t, j] = Σ_i r_t,i k_j,i e^{D(j,t)_i}
        S_end = e^{D(-1,L)} ⊙ S  +  Σ_j (k_j ⊙ e^{D(j,L)}) v_jᵀ

    The state terms are [L, N] x [N, N] matmuls; the L x L intra-chunk matrix A is an
    element-wise [L, L, N] exp-product summed over i (the spans D(j, t) from one matmul with
    a 0/1 span matrix, :func:`~rwkv_jax.kernels.common.span_sums`), then ``A @ V``. Resets
    mask A and the state terms by document (no reset between the two tokens), so a packed
    row is exactly its documents run one by one;
  * the forward also stores S before every chunk (checkpoints, [B, H, T/L, N, N] float32:
    1 GiB at B=8, T=4096, H=32, N=64, L=16; FLA's chunk_rwkv6 keeps the same per-chunk
    states);
  * backward: a reverse loop over chunks carrying dL/dS; each chunk is recomputed from its
    checkpoint and differentiated by ``jax.vjp`` of the same chunk function inside the
    kernel (:func:`~rwkv_jax.kernels.common.chunked_recurrence`).

Expected GPU cost (not yet measured; an estimate to check against benchmarks/gpu_check.sh):
per chunk and head ~0.5 M fp32 FMAs (half of them the span sums' [L², L] x [L, N] matmul, the
rest the [L, N] x [N, N] state products and the pair tensor) and L²N = 16 K exps, all on the
fp32 "ieee" path (no tensor cores): ~31 K FMAs and 1 K exps per token and head, ~65 GFLOP
per call at B=8, T=4096, C=2048, i.e. >= 1 ms at an H200's ~67 TFLOP/s fp32 if the 256
(b, h) programs (~2 per SM) kept the FMA units busy; the chunk loop is sequential per
program, so expect latency on top. Guess: 1.5-3 ms forward, ~3x that forward+backward
(the backward recomputes each chunk and runs its VJP). FLA's chunk_rwkv6 on an H100: 7.8 ms
fwd+bwd in bf16. If the span sums dominate, the [L², L] matmul is the first thing to cut
(e.g. a running sum over j, at the price of a longer kernel body).

Lowerings: Triton on GPU (grid (B, H, 1), N padded to a power of two >= 16), Mosaic on TPU
(head-major layout, time in blocks of ``TPU_BLOCK_T`` tokens on a sequential grid axis),
interpret mode on CPU. See :mod:`rwkv_jax.kernels.common`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.kernels import common
from rwkv_jax.kernels.common import (dot, dot_nt, dot_tn, masked_exp, pair_mask, prefix_matrix,
                                     row, span_sums, suffix_matrix)
from rwkv_jax.ops.impl import jit_form
from rwkv_jax.ops.wkv6 import LOG_DECAY_MIN

FORM = "wkv6 'pallas'"
DEFAULT_CHUNK = 16


def _chunk(xs, hs, S, seg):
    """One chunk: ``xs = (r, w, k, v)`` [L, N], ``hs = (u [1, N],)``, ``S`` [N_v, N_k] (the
    kernel's [value, key] layout: decays scale columns, no transposes), ``seg`` [L, N] or
    None. Returns ``(y [L, N_v], S_end)``."""
    r, w, k, v = xs
    (u,) = hs
    L, N = r.shape
    # A[t, j] = Σ_i r_t,i k_j,i e^{D(j,t)_i} for j < t in the same document
    E = masked_exp(pair_mask(L, N, seg, inclusive=False), span_sums(w, inclusive=False))
    A = jnp.sum(r[:, None, :] * k[None, :, :] * E, axis=2)
    q = r * jnp.exp(dot(prefix_matrix(L, strict=True), w))   # r_t ⊙ e^{D(-1, t)}
    kk = k * jnp.exp(dot(suffix_matrix(L), w))               # k_j ⊙ e^{D(j, L)}
    decay = jnp.exp(jnp.sum(w, axis=0, keepdims=True))       # e^{D(-1, L)} [1, N_k]
    if seg is not None:
        last = row(seg, L - 1)
        q = jnp.where(seg == 0.0, q, 0.0)        # only the first document reads S
        kk = jnp.where(seg == last, kk, 0.0)     # only the last one reaches S_end
        decay = jnp.where(last == 0.0, decay, 0.0)
    bonus = jnp.sum(r * u * k, axis=1, keepdims=True)        # Σ_i r_i u_i k_i  [L, 1]
    y = dot_nt(q, S) + dot(A, v) + bonus * v
    return y, S * decay + dot_tn(v, kk)


_run = common.chunked_recurrence(_chunk, n_seq=4, n_head=1)


@jit_form(static_argnames=("chunk_size", "platform", "interpret"))
def wkv6_pallas(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array,
                state: jax.Array | None = None, *, resets: jax.Array | None = None,
                chunk_size: int = DEFAULT_CHUNK, platform: str | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """RWKV-5/6 WKV through the chunked Pallas kernels (module docstring); differentiable in
    every input and the initial state.

    ``r, k, v`` are read in their own dtype (bf16 or fp32), ``w`` is clamped at
    :data:`~rwkv_jax.ops.wkv6.LOG_DECAY_MIN` like the ops forms; all arithmetic is fp32.
    ``chunk_size``: a power of two >= 16 (Triton's smallest dot). ``platform``: "gpu",
    "tpu" or "cpu" (default: JAX's default backend); ``interpret``: see
    :func:`~rwkv_jax.kernels.common.select_backend`.
    """
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
    L = int(chunk_size)
    if L < 16 or L & (L - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    backend = common.select_backend(FORM, platform, interpret)
    state = jnp.asarray(state, jnp.float32)
    if T == 0:
        return jnp.zeros(v.shape, v.dtype), state
    out_dtype = v.dtype
    r, w, k, v = (common.kernel_input(x) for x in (r, w, k, v))
    w = jnp.maximum(jnp.broadcast_to(w, k.shape), LOG_DECAY_MIN)

    plan = common.make_plan(backend, FORM, T, L, v.dtype)
    n_pad = common.pow2_at_least(N, 16)
    seq = common.to_layout(plan, (r, w, k, v), n_pad)
    pad2 = ((0, 0), (0, 0), (0, n_pad - N), (0, n_pad - N))
    S0 = jnp.pad(jnp.swapaxes(state, -1, -2), pad2)             # kernel layout [value, key]
    u3 = jnp.pad(jnp.asarray(u, jnp.float32), ((0, 0), (0, n_pad - N)))[:, None, :]
    y, S = _run(plan, seq, (u3,), S0, common.resets_to_layout(plan, resets, B, T))
    y = common.from_layout(plan, y, T, N).astype(out_dtype)
    return y, jnp.swapaxes(S, -1, -2)[:, :, :N, :N]
