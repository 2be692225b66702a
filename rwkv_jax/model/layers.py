"""Building blocks shared by every RWKV version, with official parameter names.

Linear, LayerNorm / GroupNorm, token shift, the official initialisers and init ratios, and
the matrix-state time-mix base of RWKV-5/6/7. Version modules (:mod:`rwkv_jax.versions`)
build on these and on nothing of each other's.

Parameters are stored under the names and shapes of the official checkpoints
(``weight`` of a Linear is ``[out, in]``), so a module's NNX state path joined with dots
is the official key, e.g. ``blocks.3.att.key.weight``.

Dtype policy: parameters live in ``param_dtype``; matmuls run in ``compute_dtype``;
LayerNorm/GroupNorm statistics, token-shift mixing, WKV and the residual stream are float32.
A LoRA adapter's low-rank path (:class:`LoRAParam`) runs in float32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import ctypes
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.functional import Module

F32 = jnp.float32


# True inside :func:`shapes_only`: a model is being built for its structure alone
_SHAPES_ONLY: contextvars.ContextVar = contextvars.ContextVar("rwkv_jax_shapes_only",
                                                              default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this block (meant around ``nnx.eval_shape``), :func:`host_rng` returns None
    without touching ``rngs``: the initialisers return zeros, and no key is split.

    Why: under ``nnx.eval_shape`` each ``rngs.params()`` is traced, and NNX's write of the
    stream's counter asks the tracer for its ``sharding``, whose error message JAX builds by
    walking the whole jaxpr so far, so a model's ~120 keys took ~0.4 s (quadratic in the
    layer count) of every checkpoint load."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def host_rng(rngs: nnx.Rngs) -> np.random.Generator | None:
    """A host generator seeded from the next ``params`` key of ``rngs`` (None when tracing).

    The key is taken (the stream advances) whether or not the caller then draws anything,
    so a gain-0 matrix never shifts the weights that follow. Under ``nnx.eval_shape`` the key
    is a tracer: None tells the initialisers to return zeros and do no random work at all;
    inside :func:`shapes_only` no key is taken at all.

    Why the host: float32 normals from numpy's SFC64 cost ~10 ns each on this CPU against
    ~30 ns for XLA:CPU's threefry, and a 0.1B model draws ~150M numbers. The arithmetic on
    them (:func:`orthogonal`'s factorisation) runs jitted in XLA.
    """
    if _SHAPES_ONLY.get():
        return None
    data = jax.random.key_data(rngs.params())
    if isinstance(data, jax.core.Tracer):
        return None
    return np.random.Generator(np.random.SFC64(np.asarray(data).ravel()))


def uniform(rng: np.random.Generator | None, shape, scale: float, dtype) -> jax.Array:
    """U(-scale, scale) (torch ``uniform_``), drawn in float32 on the host; zeros when
    ``rng`` is None (building under ``nnx.eval_shape``)."""
    if rng is None:
        return jnp.zeros(shape, dtype)
    x = _draw(rng, tuple(shape), normal=False)  # [0, 1)
    x *= np.float32(2 * scale)
    x -= np.float32(scale)
    return _to_device(x, dtype)


def orthogonal(rng: np.random.Generator | None, shape: tuple[int, int], gain: float,
               dtype) -> jax.Array:
    """A ``[out, in]`` matrix with torch ``orthogonal_(gain)`` semantics.

    ``gain·Q``, Q the orthogonal factor (with diag(R) > 0) of a standard normal matrix:
    rows orthonormal when out < in, columns when out >= in (``W Wᵀ`` resp. ``Wᵀ W`` is
    ``gain²·I``). Gain 0 gives exact zeros and draws nothing; ``rng`` None (building under
    ``nnx.eval_shape``) gives zeros.

    How, for A [m, n] (m >= n) drawn in float32 on the host: small matrices take numpy's
    Householder QR on the host (no compile); tall ones Cholesky QR (:func:`_cholesky_is_exact`):
    the Gram matrix AᵀA and the final ``A·L⁻ᵀ`` are matmuls on the device, the n x n Cholesky
    factor and its inverse float64 on the host; large near-square ones Householder QR on the
    device. Each device program is compiled once per shape (gain is an operand).
    """
    if gain == 0 or rng is None:
        return jnp.zeros(shape, dtype)
    rows, cols = (int(d) for d in shape)
    m, n = max(rows, cols), min(rows, cols)
    transpose, dtype = rows < cols, jnp.dtype(dtype)
    a = _draw(rng, (m, n), normal=True)
    with _one_lapack_thread():
        if m * n <= _HOST_QR_SIZE:
            q, r = np.linalg.qr(a)
            q *= np.where(np.diagonal(r) < 0, np.float32(-gain), np.float32(gain))
            return _to_device(q.T if transpose else q, dtype)
        a = _to_device(a, np.float32)
        if _cholesky_is_exact(m, n):
            lower = np.linalg.cholesky(np.asarray(_gram(a), np.float64))  # AᵀA = L·Lᵀ, R = Lᵀ
            l_inv = (gain * np.linalg.inv(lower)).astype(np.float32)
            w = _times_l_inv(a, l_inv, transpose=transpose, dtype=dtype)
        else:
            w = _householder(a, np.float32(gain), transpose=transpose, dtype=dtype)
        return w.block_until_ready()  # LAPACK runs now, inside the thread limit


# Householder QR on the host below this many elements (~10 ms here): small matrices skip a
# device compile (~0.3 s of CPU for a QR program), which dominates a tiny model's build.
_HOST_QR_SIZE = 1 << 18
_HIGHEST = jax.lax.Precision.HIGHEST  # exact float32 matmuls on accelerators (no TF32/bf16)


def _cholesky_is_exact(m: int, n: int) -> bool:
    """Whether Cholesky QR is as good as Householder QR for an m x n (m >= n) normal matrix.

    Cholesky QR (R from the Gram matrix AᵀA, Q = A·R⁻¹) is two matmuls, several times faster
    here than LAPACK's Householder QR, and its orthogonality error is ~eps·cond(A)². For a
    Gaussian matrix, P(σ_max > √m+√n+t) and P(σ_min < √m-√n-t) are each <= exp(-t²/2)
    (Davidson-Szarek): with t = 8 (failure < 3e-14) we require the resulting bound on
    cond(A) to stay <= 10 (error < 1e-5). Near-square or small matrices fail it.
    """
    gap = math.sqrt(m) - math.sqrt(n) - 8.0
    return gap > 0 and (math.sqrt(m) + math.sqrt(n) + 8.0) / gap <= 10.0


@jax.jit
def _gram(a: jax.Array) -> jax.Array:
    return jnp.matmul(a.T, a, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _times_l_inv(a: jax.Array, l_inv: jax.Array, *, transpose: bool, dtype) -> jax.Array:
    """Q = A·L⁻ᵀ, or Qᵀ = L⁻¹·Aᵀ if ``transpose``, in ``dtype`` (``l_inv`` carries the gain)."""
    q = jnp.matmul(l_inv, a.T, precision=_HIGHEST) if transpose else \
        jnp.matmul(a, l_inv.T, precision=_HIGHEST)
    return q.astype(dtype)


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _householder(a: jax.Array, gain: jax.Array, *, transpose: bool, dtype) -> jax.Array:
    """gain·Q (or its transpose) from Householder QR of a [m, n], with diag(R) > 0."""
    q, r = jnp.linalg.qr(a)
    q = q * jnp.where(jnp.diagonal(r) < 0, -gain, gain).astype(q.dtype)[None, :]
    return (q.T if transpose else q).astype(dtype)


# Draws larger than one block are filled block by block, each block from its own child
# generator (``Generator.spawn``), on a thread per core: numpy releases the GIL while it
# fills, and the result does not depend on the number of threads.
_DRAW_BLOCK = 1 << 20
_ALIGN = 64  # XLA:CPU takes a 64-byte aligned host buffer without copying it


def _draw(rng: np.random.Generator, shape: tuple[int, ...], *, normal: bool) -> np.ndarray:
    """A float32 array of ``shape``, standard normal or U[0, 1), in an aligned buffer."""
    size = math.prod(shape)
    raw = np.empty(size * 4 + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    out = raw[offset:offset + size * 4].view(np.float32)

    def fill(g: np.random.Generator, part: np.ndarray) -> None:
        if normal:
            g.standard_normal(dtype=np.float32, out=part)
        else:
            g.random(dtype=np.float32, out=part)

    if size <= _DRAW_BLOCK:
        fill(rng, out)
    else:
        starts = range(0, size, _DRAW_BLOCK)
        parts = [out[i:i + _DRAW_BLOCK] for i in starts]
        list(_draw_pool().map(fill, rng.spawn(len(parts)), parts))
    return out.reshape(shape)


@functools.cache
def _draw_pool() -> concurrent.futures.ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return concurrent.futures.ThreadPoolExecutor(max(1, min(cores or 1, 8)),
                                                 thread_name_prefix="rwkv-init")


def _to_device(x: np.ndarray, dtype) -> jax.Array:
    """``x`` as a device array of ``dtype``; on CPU a float32 ``x`` is aliased, not copied
    (it must not be written afterwards)."""
    try:
        y = jax.device_put(x, may_alias=True)
    except TypeError:  # a jax without ``may_alias``
        y = jnp.asarray(x)
    return y if y.dtype == jnp.dtype(dtype) else y.astype(dtype)


# OpenBLAS, which jaxlib's CPU LAPACK calls (loaded through scipy), busy-waits for its worker
# threads: on a loaded 2-core machine one 768 x 768 QR took 1.7 s of CPU with its default 2
# threads against 0.05 s with one, and one thread is as fast on a quiet machine for the small
# factorisations done here (the large matmuls are XLA's own).
_OPENBLAS_THREADS = (("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                     ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                     ("openblas_get_num_threads", "openblas_set_num_threads"),
                     ("openblas_get_num_threads64_", "openblas_set_num_threads64_"))


@contextlib.contextmanager
def _one_lapack_thread():
    """Limit every loaded OpenBLAS to one thread for the block (CPU backend, Linux only;
    elsewhere a no-op); the previous counts are restored after it."""
    saved = []
    if jax.default_backend() == "cpu":
        for get, set_ in _openblas_controls():
            saved.append((set_, get()))
            set_(1)
    try:
        yield
    finally:
        for set_, n in saved:
            set_(n)


@functools.cache
def _openblas_controls() -> tuple:
    """``(get_num_threads, set_num_threads)`` of each OpenBLAS in this process (jaxlib's is
    loaded with scipy's LAPACK, imported here so that it is present before first use)."""
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (what jaxlib's LAPACK binds to)
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f
                            if "openblas" in ln.lower() and ".so" in ln.split()[-1]})
    except (ImportError, OSError):
        return ()
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in _OPENBLAS_THREADS:
            if hasattr(lib, get) and hasattr(lib, set_):
                getter, setter = getattr(lib, get), getattr(lib, set_)
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                controls.append((getter, setter))
                break
    return tuple(controls)


def init_ratios(cfg: RWKVConfig, layer_id: int):
    """``(r01, r10, ddd)`` of the official init: the layer's position ``i/(L-1)``, ``1 - i/L``
    and the channel ramp ``c/C`` (float64 [C])."""
    L, C = cfg.n_layer, cfg.n_embd
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - layer_id / L
    ddd = np.arange(C, dtype=np.float64) / C
    return r01, r10, ddd


def param_uniform(rngs: nnx.Rngs, shape, scale: float, dtype) -> nnx.Param:
    """A parameter drawn U(-scale, scale) (official ``uniform_`` inits of LoRA matrices)."""
    return nnx.Param(uniform(host_rng(rngs), shape, scale, dtype))


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix of a :class:`Linear`: ``lora_A`` [r, in] or ``lora_B`` [out, r].

    A Variable type of its own, so a fine-tune's split can train the adapters and freeze the
    rest (:mod:`rwkv_jax.train.methods`); :mod:`rwkv_jax.lora` attaches, merges, saves them."""


# The PRNG key LoRA dropout draws from; set only while the training loss is traced
# (:func:`dropout_key`), so evaluation and inference never drop.
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("rwkv_jax_dropout_key",
                                                              default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array):
    """Within this block, adapters with dropout draw their masks from ``key`` (a typed PRNG
    key, traced: the training step derives it from its state's rng and step counter), each
    adapter ``jax.random.fold_in(key, lora_id)``. Meant for the traced training loss only:
    an eagerly called model compiles its own cached function, which must not capture a key."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class Linear(Module):
    """``y = x @ weight.T`` without bias; ``weight`` is ``[out, in]`` as in torch.

    With an adapter attached (:func:`rwkv_jax.lora.attach`): ``lora_A`` [r, in] and
    ``lora_B`` [out, r] (:class:`LoRAParam`) add ``lora_scale · (drop(x) @ A.T) @ B.T``,
    computed in float32; ``drop`` is inverted dropout of rate ``lora_dropout`` inside
    :func:`dropout_key` only. ``B = 0`` (a fresh adapter) gives exactly the plain output.
    """

    # no adapter until one is attached (instance attributes then shadow these)
    lora_A: LoRAParam | None = None
    lora_B: LoRAParam | None = None
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    lora_id: int = 0

    def __init__(self, d_in: int, d_out: int, *, init: jax.Array, compute_dtype):
        self.weight = nnx.Param(init)
        assert init.shape == (d_out, d_in), (init.shape, d_out, d_in)
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in the compute dtype, accumulated in float32."""
        y = self._base(x)
        if self.lora_A is None:
            return y
        return (y.astype(F32) + self._low_rank(x)).astype(y.dtype)

    def _low_rank(self, x: jax.Array) -> jax.Array:
        """The adapter's ``scale · (drop(x) @ A.T) @ B.T``, float32 [..., out]."""
        x = x.astype(F32)
        key = _DROPOUT_KEY.get()
        if key is not None and self.lora_dropout > 0:
            keep = 1.0 - self.lora_dropout
            mask = jax.random.bernoulli(jax.random.fold_in(key, self.lora_id), keep, x.shape)
            x = jnp.where(mask, x / keep, 0.0)
        a, b = self.lora_A[...].astype(F32), self.lora_B[...].astype(F32)
        h = jnp.einsum("...i,ri->...r", x, a)
        return self.lora_scale * jnp.einsum("...r,or->...o", h, b)

    def _base(self, x: jax.Array) -> jax.Array:
        """``x @ weight.T`` alone (see :meth:`__call__`)."""
        cd, w = self.compute_dtype, self.weight[...]
        lead = x.shape[:-1]
        rows = math.prod(lead)
        if rows < 16 and w.dtype == F32:
            # decoding is weight-bandwidth bound: casting fp32 weights to bf16 would re-read
            # and re-write all of them every token, so small batches stay in fp32
            return jnp.einsum("...i,oi->...o", x.astype(F32), w).astype(cd)
        x2 = x.reshape(rows, x.shape[-1]).astype(cd)
        if rows < _SMALL_COLS and cd != F32:
            return _weight_side_matmul(x2, w.astype(cd)).reshape(*lead, w.shape[0]).astype(cd)
        # fp32 accumulation/output: XLA:CPU's bf16-output dot measured ~3x slower
        mm = _low_precision_matmul if cd != F32 else _matmul
        y = mm(x2, w.astype(cd))[:rows]
        return y.reshape(*lead, w.shape[0]).astype(cd)


_SMALL_COLS = 4


def linear(cfg: RWKVConfig, rngs: nnx.Rngs, d_in: int, d_out: int, gain: float) -> Linear:
    """A ``[d_out, d_in]`` Linear with the official ``orthogonal_(gain)`` init (gain 0 =
    zeros), parameters in ``cfg.param_dtype``, matmuls in ``cfg.compute_dtype``."""
    w = orthogonal(host_rng(rngs), (d_out, d_in), gain, cfg.param_jnp_dtype)
    return Linear(d_in, d_out, init=w, compute_dtype=cfg.compute_jnp_dtype)


def _weight_side_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [R, in] @ w[out, in].T for a few rows R (decoding) with low-precision weights.

    Computed as ``w @ x.T`` with ``x`` padded to :data:`_SMALL_COLS` columns: XLA:CPU's
    one-row bf16 dot is a slow gemv (~1 GB/s of weights), and with the weight as the
    streamed left operand the bf16 kernels read weights ~1.5x faster than with it on the right
    (measured 12 vs 7.3 GB/s on the 50277x768 head, 9.5 vs 5.1 on 768x768).
    """
    rows = x.shape[0]
    # built column by column: a padded-then-transposed x is folded into the dot's dimension
    # numbers, and XLA:CPU then upcasts the whole weight to float32 (~15x slower); with no
    # zero column the stack itself is folded into a transpose, which XLA:CPU's bf16 dot
    # rejects, hence rows < _SMALL_COLS only
    assert rows < _SMALL_COLS, rows
    zero = jnp.zeros(x.shape[1:], x.dtype)
    xt = jnp.stack([x[i] for i in range(rows)] + [zero] * (_SMALL_COLS - rows), axis=1)
    y = jax.lax.dot_general(w, xt, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return y[:, :rows].T


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [R, in] @ w[out, in].T with float32 accumulation and output."""
    return jnp.einsum("ri,oi->ro", x, w, preferred_element_type=F32)


@jax.custom_vjp
def _low_precision_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """:func:`_matmul` for bf16/fp16 operands whose backward also runs in that dtype.

    Plain autodiff would pair the float32 cotangent with the bf16 operands, and XLA:CPU runs
    such mixed dots at the fp32 rate (measured ~4x slower than bf16 on AMX). Casting the
    cotangent to the operand dtype is what bf16 training does anyway (RWKV-LM trains in bf16);
    accumulation stays float32.
    """
    return _matmul(x, w)


_DW_CHUNKS = 8


def _lp_fwd(x, w):
    return _matmul(x, w), (x, w)


def _lp_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("ro,oi->ri", g, w, preferred_element_type=F32).astype(x.dtype)
    R = g.shape[0]
    c = _DW_CHUNKS if R % _DW_CHUNKS == 0 and R >= 64 * _DW_CHUNKS else 1
    # dW contracts over the long row axis; as a batched dot over row chunks XLA:CPU takes
    # a faster bf16 path (measured ~1.7x on [4096, 512] x [4096, 2048])
    dw = jnp.einsum("cro,cri->oi", g.reshape(c, R // c, -1), x.reshape(c, R // c, -1),
                    preferred_element_type=F32).astype(w.dtype)
    return dx, dw


_low_precision_matmul.defvjp(_lp_fwd, _lp_bwd)


class LayerNorm(Module):
    """LayerNorm over the last axis with biased variance, computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


def layer_norm(x, weight, bias, eps):
    """float32 LayerNorm of ``x`` over its last axis."""
    x = x.astype(F32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * _along_last(weight, x) + _along_last(bias, x)


def _along_last(p: jax.Array, x: jax.Array) -> jax.Array:
    """A [C] parameter as float32 shaped to broadcast over ``x``'s last axis."""
    return p.astype(F32).reshape((1,) * (x.ndim - 1) + (-1,))


def group_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, n_groups: int,
               eps: float) -> jax.Array:
    """GroupNorm over the last axis split into ``n_groups`` contiguous groups (float32)."""
    shape = x.shape
    xg = x.astype(F32).reshape(*shape[:-1], n_groups, shape[-1] // n_groups)
    mu = jnp.mean(xg, axis=-1, keepdims=True)
    xc = xg - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = (xc * jax.lax.rsqrt(var + eps)).reshape(shape)
    return y * _along_last(weight, y) + _along_last(bias, y)


def token_shift(x: jax.Array, x_prev: jax.Array, resets: jax.Array | None = None) -> jax.Array:
    """The previous token's vector at every position: [B, T, C] with row 0 = ``x_prev`` [B, C].

    ``resets`` (bool [B, T] or None): where True, a document starts and its first token sees
    zeros (the empty state's ``x_prev``) instead of the token before it. None adds no op."""
    shifted = jnp.concatenate([x_prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)
    if resets is None:
        return shifted
    return jnp.where(resets[:, :, None], jnp.zeros((), shifted.dtype), shifted)


def mix_vector(values, param_dtype) -> nnx.Param:
    """A ``[1, 1, C]`` mixing parameter, as the official checkpoints store them."""
    return nnx.Param(jnp.asarray(values, F32).reshape(1, 1, -1).astype(param_dtype))


def vec(p: nnx.Param) -> jax.Array:
    """A mixing parameter in float32, official shape kept ([1, 1, C] broadcasts over [B, T, C])."""
    return p[...].astype(F32)


# ---- the matrix-state time-mix base (RWKV-5, 6, 7) -------------------------------------------
def heads(x: jax.Array, n_head: int) -> jax.Array:
    """[B, T, C] -> [B, T, H, N]."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head)


def wkv_kwargs(cfg: RWKVConfig) -> tuple[tuple[str, object], ...]:
    """Keyword arguments of the WKV op, as a hashable tuple (modules' static attributes
    must hash: compiled functions are cached on the graph definition)."""
    kw = {"impl": cfg.wkv_impl}
    if cfg.chunk_size is not None:
        kw["chunk_size"] = cfg.chunk_size
    return tuple(kw.items())


class MatrixStateTimeMix(Module):
    """What RWKV-5, 6 and 7 time-mix share: r/k/v/output projections with the official
    init, the per-head GroupNorm ``ln_x`` (weight ``((1+i)/L)^0.7``) and a float32
    [B, H, N, N] WKV state."""

    def _init_projections(self, cfg: RWKVConfig, layer_id: int, rngs: nnx.Rngs) -> None:
        C, pd = cfg.n_embd, cfg.param_jnp_dtype
        self.receptance = linear(cfg, rngs, C, C, 1.0)
        self.key = linear(cfg, rngs, C, C, 0.1)
        self.value = linear(cfg, rngs, C, C, 1.0)
        self.output = linear(cfg, rngs, C, C, 0.0)
        self.ln_x = LayerNorm(C, cfg.ln_x_eps, pd)
        self.ln_x.weight = nnx.Param(
            jnp.full((C,), ((1 + layer_id) / cfg.n_layer) ** 0.7, F32).astype(pd))
        self.n_head = cfg.n_head
        self.wkv_kwargs = wkv_kwargs(cfg)

    def _group_norm(self, y: jax.Array) -> jax.Array:
        """WKV output [B, T, H, N] -> ``ln_x`` GroupNorm over each head, [B, T, C] float32."""
        B, T, H, N = y.shape
        return group_norm(y.reshape(B, T, H * N), self.ln_x.weight[...], self.ln_x.bias[...],
                          H, self.ln_x.eps)

    @staticmethod
    def init_state(cfg: RWKVConfig, batch_size: int) -> jax.Array:
        N = cfg.head_size
        return jnp.zeros((batch_size, cfg.n_head, N, N), F32)
