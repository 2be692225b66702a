"""What the WKV kernels share: picking a Pallas backend, calling it, and the chunked driver.

Backends (:func:`select_backend`), by platform:

  * ``"triton"``         GPU: the Pallas Triton backend (power-of-two array shapes);
  * ``"tpu"``            TPU: Mosaic TPU (block's last two dims multiples of (8, 128) or the
                         full array dims);
  * ``"interpret"``      CPU (and ``interpret=True`` on a GPU): the Triton kernels run by
                         Pallas' HLO interpreter;
  * ``"tpu_interpret"``  ``interpret=True`` with ``platform="tpu"``: the TPU kernels run by
                         Pallas' TPU interpreter on the CPU (the TPU layout and grid order,
                         testable without a TPU).

The two layouts differ in how time is split. GPU programs are independent, so one program
runs the whole sequence of one (batch, head) and carries the state in registers; the grid is
(B, H, 1). A TPU core walks the grid in order, so time is a third, sequential ("arbitrary")
grid axis of blocks of ``block_t`` tokens and the state is carried from block to block in
the final-state output block, which stays resident in VMEM while its index does not change.

:func:`chunked_recurrence` turns a per-chunk function of a matrix-state recurrence (RWKV-5/6,
RWKV-7) into a differentiable kernel pair (see its docstring); :func:`pallas_call` is the one
place a kernel meets ``pl.pallas_call``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

BACKENDS = ("triton", "tpu", "interpret", "tpu_interpret")

# fp32 contractions at full fp32 precision (Triton: "ieee" instead of TF32; TPU: multi-pass
# instead of one bf16 pass): the kernels promise fp32 accumulation.
_HI = jax.lax.Precision.HIGHEST

# TPU time block: tokens per grid step along the sequential axis. Bounds the VMEM blocks
# (each sequence input is block_t x N) whatever T is; a multiple of every chunk size.
TPU_BLOCK_T = 256


class KernelUnavailableError(NotImplementedError):
    """A Pallas form cannot run here (platform or jax build); the message names the form."""


def select_backend(form: str, platform: str | None = None,
                   interpret: bool | None = None) -> str:
    """The backend for ``form`` (e.g. "wkv6 'pallas'") on ``platform`` (default: JAX's).

    ``interpret``: None runs compiled on GPU/TPU and interpreted on CPU; True interprets
    (the TPU interpreter for ``platform="tpu"``); False on a CPU raises.
    """
    platform = (platform or jax.default_backend()).lower()
    if platform in ("gpu", "cuda", "rocm"):
        return "interpret" if interpret else "triton"
    if platform == "tpu":
        return "tpu_interpret" if interpret else "tpu"
    if platform == "cpu":
        if interpret is False:
            raise KernelUnavailableError(
                f"{form} form: Pallas kernels compile only for GPU (Triton) or TPU (Mosaic); "
                f"on the CPU they run in interpret mode (interpret=None or True)")
        return "interpret"
    raise KernelUnavailableError(f"{form} form: no Pallas kernel for platform {platform!r} "
                                 f"(GPU, TPU, or CPU interpret mode)")


def on_tpu(backend: str) -> bool:
    return backend in ("tpu", "tpu_interpret")


def pallas_call(kernel: Callable, backend: str, *, form: str, grid, in_specs, out_specs,
                out_shape, num_warps: int = 4):
    """``pl.pallas_call`` for ``backend``. The last grid axis is time: sequential on TPU.

    Triton is named by its compiler params (without them a GPU pallas_call lowers to Mosaic
    GPU in jax 0.10 / 0.11); a jax without the backend's Pallas module raises
    :class:`KernelUnavailableError` naming ``form``.
    """
    interpret = False
    params = None
    try:
        if backend == "triton":
            from jax.experimental.pallas import triton as pltriton
            params = pltriton.CompilerParams(num_warps=num_warps)
        elif on_tpu(backend):
            from jax.experimental.pallas import tpu as pltpu
            semantics = ("parallel",) * (len(grid) - 1) + ("arbitrary",)
            params = pltpu.CompilerParams(dimension_semantics=semantics)
            if backend == "tpu_interpret":
                interpret = pltpu.InterpretParams()
        elif backend == "interpret":
            interpret = True
        else:
            raise ValueError(f"unknown Pallas backend {backend!r}; valid: {', '.join(BACKENDS)}")
    except ImportError as e:
        raise KernelUnavailableError(f"{form} form: this jax has no Pallas {backend} "
                                     f"backend ({e})") from None
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                          out_specs=out_specs, compiler_params=params, interpret=interpret,
                          name=getattr(kernel, "__name__", "wkv_kernel"))


# Integer literals meeting traced indices are np.int32: under jax_enable_x64 a Python int
# lowers as i64 in Mosaic next to i32 indices (a verifier error), and every index here is i32.
def i32(x: int) -> np.int32:
    return np.int32(x)


def loop(n: int, body, init):
    """``fori_loop(0, n, body, init)``; under ``jax_enable_x64`` an int32 ``while_loop``
    instead (fori_loop then counts in int64, whose cast to int32 Mosaic mis-lowers)."""
    if jax.dtypes.canonicalize_dtype(jnp.int64) != jnp.int64:  # x64 off
        return jax.lax.fori_loop(0, n, body, init)
    _, out = jax.lax.while_loop(lambda c: c[0] < i32(n),
                                lambda c: (c[0] + i32(1), body(c[0], c[1])), (i32(0), init))
    return out


def chunk_rows(c, size: int):
    """The rows ``[c·size, (c+1)·size)`` of a ref, aligned (``c`` traced int32)."""
    return pl.ds(pl.multiple_of(c * i32(size), size), size)


KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def kernel_input(x) -> jax.Array:
    """``x`` as the kernels read it: bf16 / f16 / f32 as is, anything else (f64 under x64,
    integers) as float32 (Mosaic and Triton have no f64 vector path)."""
    x = jnp.asarray(x)
    return x if x.dtype in KERNEL_DTYPES else x.astype(jnp.float32)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pow2_at_least(x: int, floor: int) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


# ----------------------------------------------------------------------------- in-kernel blocks
# Values inside the kernels are 2-D tiles (rows = time or value index, columns = channels),
# plus [L, L, N] pair tensors for the intra-chunk terms: Triton wants power-of-two shapes
# and 2-D dots, and Mosaic lays out the last two dims of a value as (sublane, lane) tiles.

def iota(shape: tuple[int, ...], axis: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def prefix_matrix(n: int, *, strict: bool) -> jax.Array:
    """``P [n, n]`` float32 with ``(P @ x)[t] = Σ_{m<t} x_m`` (strict) or ``Σ_{m≤t}``."""
    t, m = iota((n, n), 0), iota((n, n), 1)
    return ((m < t) if strict else (m <= t)).astype(jnp.float32)


def suffix_matrix(n: int) -> jax.Array:
    """``Q [n, n]`` float32 with ``(Q @ x)[t] = Σ_{m>t} x_m``."""
    t, m = iota((n, n), 0), iota((n, n), 1)
    return (m > t).astype(jnp.float32)


def dot(a, b):
    """``a @ b`` in fp32 at full precision."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """``a @ bᵀ``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``aᵀ @ b``."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def row(x: jax.Array, j: int) -> jax.Array:
    """Row ``j`` (static) of ``x [L, N]`` as ``[1, N]``, by a masked sum (Triton cannot
    slice a value)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def span_sums(w: jax.Array, *, inclusive: bool) -> jax.Array:
    """``D [L, L, N]`` with ``D[t, j] = Σ_{j<m<t} w_m`` (``Σ_{j<m≤t}`` if ``inclusive``),
    for the pairs j < t (j ≤ t) that use it; other entries are 0.

    Each sum is taken directly over its span (one [L², L] x [L, N] matmul with a 0/1
    matrix), never as a difference of cumulative sums: with log decays down to -1e4 such a
    difference cancels, and its fp32 error becomes the relative error of factors near 1.
    """
    L, N = w.shape
    t, j, m = iota((L, L, L), 0), iota((L, L, L), 1), iota((L, L, L), 2)
    span = (j < m) & ((m <= t) if inclusive else (m < t))
    return dot(span.astype(jnp.float32).reshape(L * L, L), w).reshape(L, L, N)


def pair_mask(L: int, N: int, seg: jax.Array | None, *, inclusive: bool) -> jax.Array:
    """``[L, L, N]`` bool: pairs (t, j) with j < t (j ≤ t) in the same document."""
    t, j = iota((L, L, N), 0), iota((L, L, N), 1)
    mask = (j <= t) if inclusive else (j < t)
    if seg is not None:
        mask = mask & (seg[:, None, :] == seg[None, :, :])
    return mask


def segments(reset_col: jax.Array, n: int) -> jax.Array:
    """Document index of each token inside a chunk, ``[L, n]`` float32 (equal along a row):
    the number of resets at or before it. Tokens i, j share a state iff their indices match;
    a token reads the chunk's start state iff its index is 0."""
    L = reset_col.shape[0]
    return dot(prefix_matrix(L, strict=False), jnp.broadcast_to(reset_col, (L, n)))


def masked_exp(mask, x):
    """``exp(x)`` where ``mask``, exactly 0 elsewhere (the mask goes on the exponent, so no
    overflowed value and no ``inf·0`` in the value or its gradient)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


# ----------------------------------------------------------------------------- chunked driver

@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of one chunked kernel call (hashable: a custom_vjp nondiff argument).

    ``block_t`` tokens per grid step along time (``n_blocks`` steps; one on GPU), split into
    chunks of ``chunk``; sequence arrays are [B, T_pad, H, N] on GPU and head-major
    [B, H, T_pad, N] on TPU, with ``T_pad = block_t·n_blocks``.
    """

    backend: str
    form: str
    chunk: int
    block_t: int
    n_blocks: int
    out_dtype: str
    num_warps_fwd: int = 4
    num_warps_bwd: int = 8

    @property
    def t_pad(self) -> int:
        return self.block_t * self.n_blocks


def make_plan(backend: str, form: str, T: int, chunk: int, out_dtype) -> Plan:
    t_pad = round_up(max(T, 1), chunk)
    block_t, n_blocks = t_pad, 1
    if on_tpu(backend) and t_pad > TPU_BLOCK_T:
        block_t = TPU_BLOCK_T
        n_blocks = -(-t_pad // block_t)
    return Plan(backend, form, chunk, block_t, n_blocks, jnp.dtype(out_dtype).name)


class _Specs:
    """BlockSpecs for the grid (B, H, n_blocks) of ``plan``; ``reverse`` walks time backwards.

    Every kernel ref is 2-D (sequence: [block_t, N]; state: [N, N]; head vector: [1, N];
    resets: [block_t, 1]) or 3-D (checkpoints: [block_t // chunk, N, N]).
    """

    def __init__(self, plan: Plan, N: int, reverse: bool = False):
        self.plan, self.N = plan, N
        nb = plan.n_blocks
        self.t = (lambda t: nb - 1 - t) if reverse else (lambda t: t)

    def seq(self):
        p, N, tf = self.plan, self.N, self.t
        if on_tpu(p.backend):  # [B, H, T, N]
            return pl.BlockSpec((None, None, p.block_t, N), lambda b, h, t: (b, h, tf(t), 0))
        return pl.BlockSpec((None, p.block_t, None, N), lambda b, h, t: (b, tf(t), h, 0))

    def resets(self):
        tf = self.t
        return pl.BlockSpec((None, self.plan.block_t, 1), lambda b, h, t: (b, tf(t), 0))

    def state(self):
        N = self.N
        return pl.BlockSpec((None, None, N, N), lambda b, h, t: (b, h, 0, 0))

    def head(self):  # [H, 1, N]
        return pl.BlockSpec((None, 1, self.N), lambda b, h, t: (h, 0, 0))

    def head_grad(self):  # [B, H, 1, N]
        return pl.BlockSpec((None, None, 1, self.N), lambda b, h, t: (b, h, 0, 0))

    def ckpt(self):  # [B, H, n_chunks, N, N]
        p, N, tf = self.plan, self.N, self.t
        nc = p.block_t // p.chunk
        return pl.BlockSpec((None, None, nc, N, N), lambda b, h, t: (b, h, tf(t), 0, 0))


ChunkFn = Callable[[tuple, tuple, jax.Array, "jax.Array | None"], tuple[jax.Array, jax.Array]]


def chunked_recurrence(chunk_fn: ChunkFn, n_seq: int, n_head: int):
    """A differentiable Pallas kernel pair for a matrix-state recurrence given per chunk.

    ``chunk_fn(xs, hs, S, seg) -> (y, S_end)``: one chunk of L tokens, 2-D fp32 values only:
    ``xs`` the ``n_seq`` sequence inputs [L, N], ``hs`` the ``n_head`` per-head vectors
    [1, N], ``S`` [N, N] the state before the chunk, ``seg`` [L, N] the tokens' document
    indices (:func:`segments`) or None without resets; ``y`` [L, N].

    Returns ``run(plan, seq, head, S0, resets) -> (y, S_T)`` with a custom VJP, for arrays in
    ``plan``'s layout (padded; :func:`to_layout`): ``seq`` a tuple of [B, T, H, N] (TPU:
    [B, H, T, N]) arrays of any float dtype, ``head`` a tuple of [H, 1, N] float32, ``S0``
    [B, H, N, N] float32, ``resets`` [B, T, 1] float32 (1.0 = reset) or None.

    Forward kernel: per (b, h), a loop over chunks carrying S; for the backward it also
    stores S before every chunk (checkpoints, [B, H, T/L, N, N] float32). Backward kernel:
    a reverse loop over chunks carrying dL/dS; each chunk is recomputed from its checkpoint
    and differentiated by ``jax.vjp`` of ``chunk_fn`` inside the kernel (so forward and
    backward are the same math by construction). Gradients of the sequence inputs come back
    in their dtypes; of the head vectors and S0 in float32.
    """

    def forward(plan: Plan, seq, head, S0, resets, save: bool):
        B, H, N = S0.shape[0], S0.shape[1], S0.shape[-1]
        sp = _Specs(plan, N)
        L, nc_blk = plan.chunk, plan.block_t // plan.chunk
        has_resets = resets is not None

        def kernel(*refs):
            it = iter(refs)
            seq_refs = [next(it) for _ in range(n_seq)]
            head_refs = [next(it) for _ in range(n_head)]
            s0_ref = next(it)
            reset_ref = next(it) if has_resets else None
            y_ref, sT_ref = next(it), next(it)
            ckpt_ref = next(it) if save else None
            hs = tuple(h[...].astype(jnp.float32) for h in head_refs)
            if plan.n_blocks == 1:
                S_in = s0_ref[...]
            else:  # TPU: the state crosses time blocks in the resident final-state block
                @pl.when(pl.program_id(2) == i32(0))
                def _():
                    sT_ref[...] = s0_ref[...]

                S_in = sT_ref[...]

            def body(c, S):
                sl = chunk_rows(c, L)
                xs = tuple(r[sl, :].astype(jnp.float32) for r in seq_refs)
                seg = None if reset_ref is None else segments(reset_ref[sl, :], N)
                if ckpt_ref is not None:
                    ckpt_ref[c] = S
                y, S = chunk_fn(xs, hs, S, seg)
                y_ref[sl, :] = y.astype(y_ref.dtype)
                return S

            sT_ref[...] = loop(nc_blk, body, S_in)

        kernel.__name__ = f"{plan.form.split()[0]}_fwd"
        in_specs = ([sp.seq()] * n_seq + [sp.head()] * n_head + [sp.state()]
                    + ([sp.resets()] if has_resets else []))
        seq_shape = seq[0].shape
        out_shape = [jax.ShapeDtypeStruct(seq_shape, jnp.dtype(plan.out_dtype)),
                     jax.ShapeDtypeStruct(S0.shape, jnp.float32)]
        out_specs = [sp.seq(), sp.state()]
        if save:
            out_shape.append(jax.ShapeDtypeStruct((B, H, plan.t_pad // L, N, N), jnp.float32))
            out_specs.append(sp.ckpt())
        args = (*seq, *head, S0) + ((resets,) if has_resets else ())
        out = pallas_call(kernel, plan.backend, form=plan.form, grid=(B, H, plan.n_blocks),
                          in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          num_warps=plan.num_warps_fwd)(*args)
        return out[0], out[1], (out[2] if save else None)

    def backward(plan: Plan, seq, head, ckpt, resets, gy, gS):
        B, H, N = gS.shape[0], gS.shape[1], gS.shape[-1]
        sp = _Specs(plan, N, reverse=True)
        L, nc_blk = plan.chunk, plan.block_t // plan.chunk
        has_resets = resets is not None

        def kernel(*refs):
            it = iter(refs)
            seq_refs = [next(it) for _ in range(n_seq)]
            head_refs = [next(it) for _ in range(n_head)]
            ckpt_ref = next(it)
            reset_ref = next(it) if has_resets else None
            gy_ref, gsT_ref = next(it), next(it)
            gseq_refs = [next(it) for _ in range(n_seq)]
            ghead_refs = [next(it) for _ in range(n_head)]
            gs0_ref = next(it)
            hs = tuple(h[...].astype(jnp.float32) for h in head_refs)
            if plan.n_blocks == 1:
                dS = gsT_ref[...]
                gh = tuple(jnp.zeros_like(h) for h in hs)
            else:  # TPU: dL/dS and the head gradients cross blocks in their output blocks
                @pl.when(pl.program_id(2) == i32(0))
                def _():
                    gs0_ref[...] = gsT_ref[...]
                    for g in ghead_refs:
                        g[...] = jnp.zeros(g.shape, g.dtype)

                dS = gs0_ref[...]
                gh = tuple(g[...] for g in ghead_refs)

            def body(i, carry):
                dS, gh = carry
                c = i32(nc_blk - 1) - i
                sl = chunk_rows(c, L)
                xs = tuple(r[sl, :].astype(jnp.float32) for r in seq_refs)
                seg = None if reset_ref is None else segments(reset_ref[sl, :], N)
                _, vjp = jax.vjp(lambda xs, hs, S: chunk_fn(xs, hs, S, seg), xs, hs, ckpt_ref[c])
                gxs, ghs, dS = vjp((gy_ref[sl, :].astype(jnp.float32), dS))
                for ref, g in zip(gseq_refs, gxs):
                    ref[sl, :] = g.astype(ref.dtype)
                return dS, tuple(a + b for a, b in zip(gh, ghs))

            dS, gh = loop(nc_blk, body, (dS, gh))
            gs0_ref[...] = dS
            for ref, g in zip(ghead_refs, gh):
                ref[...] = g

        kernel.__name__ = f"{plan.form.split()[0]}_bwd"
        in_specs = ([sp.seq()] * n_seq + [sp.head()] * n_head + [sp.ckpt()]
                    + ([sp.resets()] if has_resets else []) + [sp.seq(), sp.state()])
        out_specs = [sp.seq()] * n_seq + [sp.head_grad()] * n_head + [sp.state()]
        out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in seq]
                     + [jax.ShapeDtypeStruct((B, H, 1, N), jnp.float32)] * n_head
                     + [jax.ShapeDtypeStruct(gS.shape, jnp.float32)])
        args = (*seq, *head, ckpt) + ((resets,) if has_resets else ()) + (gy, gS)
        out = pallas_call(kernel, plan.backend, form=plan.form, grid=(B, H, plan.n_blocks),
                          in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          num_warps=plan.num_warps_bwd)(*args)
        gseq = tuple(out[:n_seq])
        ghead = tuple(jnp.sum(g, axis=0) for g in out[n_seq:n_seq + n_head])  # [H, 1, N]
        return gseq, ghead, out[-1]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def run(plan: Plan, seq, head, S0, resets):
        y, S, _ = forward(plan, seq, head, S0, resets, save=False)
        return y, S

    def run_fwd(plan, seq, head, S0, resets):
        y, S, ckpt = forward(plan, seq, head, S0, resets, save=True)
        return (y, S), (seq, head, ckpt, resets)

    def run_bwd(plan, res, cot):
        seq, head, ckpt, resets = res
        gy, gS = cot
        gseq, ghead, gS0 = backward(plan, seq, head, ckpt, resets, gy, gS)
        return gseq, ghead, gS0, None if resets is None else jnp.zeros_like(resets)

    run.defvjp(run_fwd, run_bwd)
    return run


# ----------------------------------------------------------------------------- layout

def to_layout(plan: Plan, xs: Sequence[jax.Array], n_pad: int) -> tuple[jax.Array, ...]:
    """[B, T, H, N] arrays -> ``plan``'s padded layout: T zero-padded to ``plan.t_pad``, N to
    ``n_pad``; head-major [B, H, T, N] on TPU. (Zero padding is what every recurrence here
    ignores: zero keys/values add nothing and a zero log decay keeps the state.)"""
    out = []
    for x in xs:
        _, T, _, N = x.shape
        x = jnp.pad(x, ((0, 0), (0, plan.t_pad - T), (0, 0), (0, n_pad - N)))
        out.append(jnp.swapaxes(x, 1, 2) if on_tpu(plan.backend) else x)
    return tuple(out)


def from_layout(plan: Plan, y: jax.Array, T: int, N: int) -> jax.Array:
    """Inverse of :func:`to_layout` for one array: [B, T, H, N]."""
    if on_tpu(plan.backend):
        y = jnp.swapaxes(y, 1, 2)
    return y[:, :T, :, :N]


def resets_to_layout(plan: Plan, resets: jax.Array | None, B: int, T: int):
    """Optional bool [B, T] -> float32 [B, T_pad, 1] (1.0 = the token starts a document)."""
    if resets is None:
        return None
    resets = jnp.asarray(resets)
    if resets.shape != (B, T):
        raise ValueError(f"resets must be bool [B, T] = {(B, T)}; got {resets.shape}")
    r = jnp.pad(resets.astype(jnp.float32), ((0, 0), (0, plan.t_pad - T)))
    return r[..., None]
