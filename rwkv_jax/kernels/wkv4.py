"""RWKV-4 WKV as a Pallas kernel pair (forward, reverse-time backward), same contract as ops.

Legend and contract as :mod:`rwkv_jax.ops.wkv4`: ``w, u`` [C], ``k, v`` [B, T, C], state
:class:`~rwkv_jax.ops.wkv4.Wkv4State` (aa, bb, pp) [B, C] float32; returns
``(y [B, T, C] in v's dtype, final state)``. ``resets`` (bool [B, T]): token t of row b
starts a new document (the state before it becomes the empty state aa = bb = 0,
pp = -1e38).

Design: one program per (batch row, channel block) runs the official per-token step
(:func:`~rwkv_jax.ops.wkv4.wkv4_step`) over T with the state in registers, the layout of the
official CUDA kernel (one thread per channel). The forward also writes the (post-reset) state
before each token (3 x [B, T, C] float32, what ``wkv4_scan`` keeps); the backward kernel
runs the reverse-time step of the scan form's hand-written backward
(:func:`~rwkv_jax.ops.wkv4.wkv4_bwd_step`), so both are the same float32 operations in the
same order as ``wkv4_scan`` (bit for bit in interpret mode; compiled, exp and division may
differ by ulps). A reset zeroes the adjoint carried past it.

Expected GPU cost (not yet measured): memory-bound like the official kernel (0.76 / 3.2 ms
fwd / fwd+bwd at B=8, T=4096, C=2048 on an H100): k, v read once, y written once forward;
the saved states triple the backward's traffic (~1 GB at that shape, ~0.3 ms at 3 TB/s).

Lowerings, by platform (:func:`~rwkv_jax.kernels.common.select_backend`):
  * Triton (GPU): grid (B, C / 32, 1); one [1, 32] row per step (32 contiguous floats, one
    coalesced access per warp); T unpadded;
  * Mosaic (TPU): grid (B, C / 128, T / 256) with time sequential; per step of the loop a
    [16, 128] tile is loaded and its 16 tokens stepped one by one (static row slices); T
    padded to a multiple of 16 with the padded steps masked (a zero key would still decay
    the state); the state crosses time blocks in the resident final-state block;
  * interpret mode on CPU (the Triton layout) or ``platform="tpu", interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_jax.kernels import common
from rwkv_jax.kernels.common import chunk_rows, i32, loop
from rwkv_jax.ops.impl import jit_form
from rwkv_jax.ops.wkv4 import PP_EMPTY, Wkv4State, wkv4_bwd_step, wkv4_step

FORM = "wkv4 'pallas'"

# Channels per program on GPU. The official CUDA kernel runs one thread per (batch, channel)
# in blocks of min(C, 32) threads; 32 channels and one warp per program is the same layout.
# Not tuned on a GPU yet: ``block_c=`` overrides it. TPU: one lane row (128).
PALLAS_BLOCK_C = 32
TPU_BLOCK_C = 128
TPU_GROUP = 16       # tokens per loaded tile on TPU (a bf16 (16, 128) tile)
TPU_BLOCK_T = 256    # tokens per sequential grid step on TPU


@dataclasses.dataclass(frozen=True)
class _Plan:
    backend: str
    block_c: int
    group: int      # tokens per load (1 on GPU)
    block_t: int
    n_blocks: int
    T: int          # real length; steps t >= T (TPU padding) are masked

    @property
    def t_pad(self) -> int:
        return self.block_t * self.n_blocks

    @property
    def masked(self) -> bool:
        return self.t_pad != self.T


def _plan(backend: str, T: int, block_c: int | None) -> _Plan:
    if common.on_tpu(backend):
        if block_c is not None and block_c % TPU_BLOCK_C:
            raise ValueError(f"block_c must be a multiple of {TPU_BLOCK_C} on TPU, got {block_c}")
        t_pad = common.round_up(T, TPU_GROUP)
        block_t = min(t_pad, TPU_BLOCK_T)
        return _Plan(backend, block_c or TPU_BLOCK_C, TPU_GROUP, block_t,
                     -(-t_pad // block_t), T)
    block_c = PALLAS_BLOCK_C if block_c is None else block_c
    if block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two, got {block_c}")
    return _Plan(backend, block_c, 1, T, 1, T)


def _specs(p: _Plan, kinds, reverse=False):
    """BlockSpecs on the grid (B, C / block_c, n_blocks): "seq" [B, T, C] -> [block_t,
    block_c]; "row" [B, 1, C] -> [1, block_c]; "reset" [B, T, 1] -> [block_t, 1]."""
    nb = p.n_blocks
    tf = (lambda t: nb - 1 - t) if reverse else (lambda t: t)
    make = {
        "seq": lambda: pl.BlockSpec((None, p.block_t, p.block_c), lambda b, c, t: (b, tf(t), c)),
        "row": lambda: pl.BlockSpec((None, 1, p.block_c), lambda b, c, t: (b, 0, c)),
        "reset": lambda: pl.BlockSpec((None, p.block_t, 1), lambda b, c, t: (b, tf(t), 0)),
    }
    return [make[kd]() for kd in kinds]


def _rows(p: _Plan, x, i):
    """Token ``i`` of a loaded [group, block_c] tile, as [1, block_c]."""
    return x if p.group == 1 else x[i:i + 1, :]


def _stack(p: _Plan, rows):
    return rows[0] if p.group == 1 else jnp.concatenate(rows, axis=0)


def _fwd_kernel(p: _Plan, save: bool, has_resets: bool, *refs):
    """One (b, channel block, time block): the step loop; state in values (registers).

    With ``save`` it also writes the state each token starts from (after its reset), which
    the backward kernel reads.
    """
    it = iter(refs)
    w_ref, u_ref, k_ref, v_ref, aa_ref, bb_ref, pp_ref = (next(it) for _ in range(7))
    rs_ref = next(it) if has_resets else None
    y_ref, aaT_ref, bbT_ref, ppT_ref = (next(it) for _ in range(4))
    prev_refs = tuple(next(it) for _ in range(3)) if save else ()
    w, u = w_ref[...], u_ref[...]
    if p.n_blocks == 1:
        init = (aa_ref[...], bb_ref[...], pp_ref[...])
    else:  # TPU: the state crosses time blocks in the resident final-state block
        @pl.when(pl.program_id(2) == i32(0))
        def _():
            aaT_ref[...], bbT_ref[...], ppT_ref[...] = aa_ref[...], bb_ref[...], pp_ref[...]

        init = (aaT_ref[...], bbT_ref[...], ppT_ref[...])
    t_block = pl.program_id(2) * i32(p.block_t)

    def body(g, st):
        sl = chunk_rows(g, p.group)
        k, v = k_ref[sl, :].astype(jnp.float32), v_ref[sl, :].astype(jnp.float32)
        rs = rs_ref[sl, :] if has_resets else None
        ys, prev = [], []
        for i in range(p.group):
            if has_resets:
                new_doc = _rows(p, rs, i) > 0.0
                st = (jnp.where(new_doc, 0.0, st[0]), jnp.where(new_doc, 0.0, st[1]),
                      jnp.where(new_doc, PP_EMPTY, st[2]))
            prev.append(st)
            y_t, new = wkv4_step(w, u, _rows(p, k, i), _rows(p, v, i), Wkv4State(*st))
            if p.masked:
                valid = t_block + g * i32(p.group) + i32(i) < i32(p.T)
                new = tuple(jnp.where(valid, a, b) for a, b in zip(new, st))
            ys.append(y_t)
            st = tuple(new)
        y_ref[sl, :] = _stack(p, ys)
        for n, ref in enumerate(prev_refs):
            ref[sl, :] = _stack(p, [s[n] for s in prev])
        return st

    aaT_ref[...], bbT_ref[...], ppT_ref[...] = loop(p.block_t // p.group, body, init)


def _bwd_kernel(p: _Plan, has_resets: bool, *refs):
    """One (b, channel block, time block), time reversed: the reverse step of the scan form
    (:func:`~rwkv_jax.ops.wkv4.wkv4_bwd_step`); ``pp_t`` (the running max after token t)
    is recomputed exactly as the forward computed it. Writes gk, gv per token; gw, gu as
    this row's sums (reduced over B by the caller); the initial state's gradient last."""
    it = iter(refs)
    (w_ref, u_ref, k_ref, v_ref, y_ref, gy_ref, aap_ref, bbp_ref, ppp_ref) = (
        next(it) for _ in range(9))
    rs_ref = next(it) if has_resets else None
    aaT_ref, bbT_ref, gaa_ref, gbb_ref, gpp_ref = (next(it) for _ in range(5))
    gk_ref, gv_ref, gw_ref, gu_ref, gaa0_ref, gbb0_ref, gpp0_ref = (next(it) for _ in range(7))
    w, u = w_ref[...], u_ref[...]
    g_aa, g_bb = gaa_ref[...], gbb_ref[...]
    zero = jnp.zeros_like(g_aa)
    init = (g_aa, g_bb, gpp_ref[...] - g_aa * aaT_ref[...] - g_bb * bbT_ref[...], zero, zero)
    carry_refs = (gaa0_ref, gbb0_ref, gpp0_ref, gw_ref, gu_ref)
    if p.n_blocks > 1:  # TPU: the adjoint crosses time blocks in its resident output blocks
        @pl.when(pl.program_id(2) == i32(0))
        def _():
            for ref, x in zip(carry_refs, init):
                ref[...] = x

        init = tuple(ref[...] for ref in carry_refs)
    t_block = (i32(p.n_blocks - 1) - pl.program_id(2)) * i32(p.block_t)
    n_groups = p.block_t // p.group

    def body(j, carry):
        g = i32(n_groups - 1) - j
        sl = chunk_rows(g, p.group)
        k, v = k_ref[sl, :].astype(jnp.float32), v_ref[sl, :].astype(jnp.float32)
        y, gy = y_ref[sl, :], gy_ref[sl, :].astype(jnp.float32)
        aap, bbp, ppp = aap_ref[sl, :], bbp_ref[sl, :], ppp_ref[sl, :]
        rs = rs_ref[sl, :] if has_resets else None
        gks, gvs = [None] * p.group, [None] * p.group
        for i in reversed(range(p.group)):
            k_t, pp = _rows(p, k, i), _rows(p, ppp, i)
            pp_t = jnp.maximum(pp + w, k_t)  # the forward's q: bit-identical
            new, gk, gv = wkv4_bwd_step(w, u, k_t, _rows(p, v, i), _rows(p, y, i),
                                        _rows(p, gy, i), _rows(p, aap, i), _rows(p, bbp, i),
                                        pp, pp_t, carry)
            if has_resets:  # the state before a reset is discarded: no gradient reaches it
                new_doc = _rows(p, rs, i) > 0.0
                new = tuple(jnp.where(new_doc, 0.0, x) for x in new[:3]) + tuple(new[3:])
            if p.masked:
                valid = t_block + g * i32(p.group) + i32(i) < i32(p.T)
                new = tuple(jnp.where(valid, a, b) for a, b in zip(new, carry))
            gks[i], gvs[i], carry = gk, gv, tuple(new)
        gk_ref[sl, :] = _stack(p, gks).astype(gk_ref.dtype)
        gv_ref[sl, :] = _stack(p, gvs).astype(gv_ref.dtype)
        return carry

    alpha, beta, gpp, gw, gu = loop(n_groups, body, init)
    gw_ref[...], gu_ref[...], gaa0_ref[...], gbb0_ref[...] = gw, gu, alpha, beta
    gpp0_ref[...] = gpp  # the raw carry, while time blocks remain (TPU)

    @pl.when(pl.program_id(2) == i32(p.n_blocks - 1))
    def _():  # a0 = aa0·e^{pp0}: pp0 also gets α̃·aa0 + β̃·bb0 (time block 0 holds t = 0)
        first = pl.ds(0, 1)
        gpp0_ref[...] = gpp + alpha * aap_ref[first, :] + beta * bbp_ref[first, :]


def _call(p: _Plan, kernel, name, args, in_kinds, out_shape, out_kinds, reverse=False):
    kernel.__name__ = name
    B, _, C = args[2].shape
    return common.pallas_call(kernel, p.backend, form=FORM,
                              grid=(B, C // p.block_c, p.n_blocks),
                              in_specs=_specs(p, in_kinds, reverse),
                              out_specs=_specs(p, out_kinds, reverse), out_shape=out_shape,
                              num_warps=max(1, p.block_c // 32))(*args)


def _forward(p: _Plan, w, u, k, v, aa, bb, pp, resets, save):
    B, T, C = k.shape
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    has_resets = resets is not None
    out_shape = [f32((B, T, C)), f32((B, 1, C)), f32((B, 1, C)), f32((B, 1, C))]
    out_kinds = ["seq", "row", "row", "row"] + ["seq"] * 3 * save
    out_shape += [f32((B, T, C))] * 3 * save
    in_kinds = ["row", "row", "seq", "seq", "row", "row", "row"] + ["reset"] * has_resets
    args = (w, u, k, v, aa, bb, pp) + ((resets,) if has_resets else ())
    out = _call(p, functools.partial(_fwd_kernel, p, save, has_resets), "wkv4_fwd", args,
                in_kinds, out_shape, out_kinds)
    return tuple(out[:4]), tuple(out[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(p: _Plan, w, u, k, v, aa, bb, pp, resets):
    """float32 ``w, u`` and state fields [B, 1, C], ``k, v`` [B, T, C] (any float dtype),
    padded to the plan -> ``(y [B, T, C] float32, aa, bb, pp)``."""
    return _forward(p, w, u, k, v, aa, bb, pp, resets, save=False)[0]


def _core_fwd(p, w, u, k, v, aa, bb, pp, resets):
    out, prev = _forward(p, w, u, k, v, aa, bb, pp, resets, save=True)
    return out, (w, u, k, v, out, prev, resets)


def _core_bwd(p, res, cot):
    w, u, k, v, (y, aa_T, bb_T, _), prev, resets = res
    gy, g_aa, g_bb, g_pp = cot
    B, _, C = k.shape
    has_resets = resets is not None
    row = jax.ShapeDtypeStruct((B, 1, C), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *[row] * 5]
    in_kinds = (["row", "row"] + ["seq"] * 7 + ["reset"] * has_resets + ["row"] * 5)
    args = ((w, u, k, v, y, gy, *prev) + ((resets,) if has_resets else ())
            + (aa_T, bb_T, g_aa, g_bb, g_pp))
    gk, gv, gw, gu, g_aa0, g_bb0, g_pp0 = _call(
        p, functools.partial(_bwd_kernel, p, has_resets), "wkv4_bwd", args, in_kinds,
        out_shape, ["seq", "seq", *["row"] * 5], reverse=True)
    return (gw, gu, gk, gv, g_aa0, g_bb0, g_pp0,
            None if resets is None else jnp.zeros_like(resets))


_core.defvjp(_core_fwd, _core_bwd)


@jit_form(static_argnames=("platform", "interpret", "block_c"))
def wkv4_pallas(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array,
                state: Wkv4State | None = None, *, resets: jax.Array | None = None,
                platform: str | None = None, interpret: bool | None = None,
                block_c: int | None = None) -> tuple[jax.Array, Wkv4State]:
    """RWKV-4 WKV through the Pallas kernels (module docstring); differentiable in every
    input and the initial state.

    ``w, u`` [C] (or [B, C]), ``k, v`` [B, T, C] (read in their own dtype, accumulated in
    float32), ``state`` fields [B, C] float32 or None (the empty state); returns
    ``(y [B, T, C] in v's dtype, final state float32)``. C is padded to a multiple of
    ``block_c`` (GPU: a power of two, default ``PALLAS_BLOCK_C`` = 32; TPU: a multiple of
    128) with empty-state channels (w = -1), sliced off. ``platform``/``interpret``: see
    :func:`~rwkv_jax.kernels.common.select_backend`.
    """
    out_dtype = v.dtype
    B, T, C = k.shape
    p = _plan(common.select_backend(FORM, platform, interpret), T, block_c)
    if state is None:
        state = Wkv4State.zeros(B, C)
    aa, bb, pp = (jnp.asarray(s, jnp.float32) for s in state)
    if T == 0:
        return jnp.zeros((B, 0, C), out_dtype), Wkv4State(aa, bb, pp)
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (B, C))
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32), (B, C))
    pad_c, pad_t = -C % p.block_c, p.t_pad - T

    def row(x, fill):  # [B, C] -> [B, 1, C_pad]
        return jnp.pad(x, ((0, 0), (0, pad_c)), constant_values=fill)[:, None, :]

    def seq(x):
        return jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c)))

    rs = None
    if resets is not None:
        resets = jnp.asarray(resets)
        if resets.shape != (B, T):
            raise ValueError(f"resets must be bool [B, T] = {(B, T)}; got {resets.shape}")
        rs = jnp.pad(resets.astype(jnp.float32), ((0, 0), (0, pad_t)))[..., None]
    k, v = common.kernel_input(k), common.kernel_input(v)
    y, aa, bb, pp = _core(p, row(w, -1.0), row(u, 0.0), seq(k), seq(v), row(aa, 0.0),
                          row(bb, 0.0), row(pp, PP_EMPTY), rs)
    y, aa, bb, pp = y[:, :T, :C], aa[:, 0, :C], bb[:, 0, :C], pp[:, 0, :C]
    return y.astype(out_dtype), Wkv4State(aa, bb, pp)
