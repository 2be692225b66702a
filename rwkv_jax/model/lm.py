"""The RWKV language model: embedding, ``ln0``, blocks, ``ln_out``, head (reference §1).

``RWKV(cfg, rngs=...)`` builds any version of :mod:`rwkv_jax.versions`; parameter paths
are the official checkpoint keys. The model is a pure function of its inputs and a state::

    logits, state = model(tokens)                     # [B, T] int -> [B, T, V] float32
    logits, state = model(more, state)                # continue from the returned state
    last, state = model(prompt, logits_to_keep=1)     # [B, 1, V]: the head for the last only
    logits, state = model(packed, resets=starts)      # several documents per row (below)

Running a sequence whole, as a prefix then the continued state, or one token at a time
gives the same logits.

Packed documents: ``resets`` (bool [B, T], True at the first token of each document) makes
every document start from the empty state, as if run alone: at a reset position the token
shift sees zeros and the WKV the empty state (a reset at position 0 discards ``state``). The
logits of each document, the gradients, and the returned state (that of the row's last
document) equal running the documents one by one from the empty state. ``resets=None`` is
the same program as without the argument.

What is compiled when. Called eagerly (no ``jit`` around it), ``model(...)`` runs a jitted
pure function of the model's arrays, cached on (model structure, shapes, dtypes,
``logits_to_keep``, ``resets`` given or None): a repeated call compiles nothing, and nothing
grows. The sequence is cut
into chunks of the lengths in :data:`PREFILL_SIZES` (the state carried between them, which is
exact for a recurrence), so prompts of any length compile at most ``len(PREFILL_SIZES)``
shapes per batch size. A short call from the empty state (at most :data:`PAD_UP_TO` tokens,
not itself a chunk size) runs as one left-padded chunk with a reset at its first real token
(:func:`padded_length`): one pass over the weights, one more program per such size. Inside
a user's ``jax.jit``/``nnx.jit``/``jax.grad`` the call is traced inline, whole, as part of
the caller's computation.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import functional
from rwkv_jax.model.layers import (F32, LayerNorm, Linear, Module, host_rng, orthogonal,
                                   shapes_only, uniform)


class LayerState(NamedTuple):
    """One layer's recurrent state, all float32.

    att_x_prev: [B, C] last ``ln1`` output (time-mix token shift).
    wkv: the version's WKV state (RWKV-4: ``Wkv4State``; v5/v6: [B, H, N, N] indexed
      [key, value]; v7: [B, H, N, N] indexed [value, key], as the official package keeps them).
    ffn_x_prev: [B, C] last ``ln2`` output (channel-mix token shift).
    """

    att_x_prev: jax.Array
    wkv: Any
    ffn_x_prev: jax.Array


RWKVState = tuple[LayerState, ...]

# Chunk lengths of an eager call: a sequence of T tokens runs as chunks taken greedily from
# these sizes (1000 = 3x256 + 3x64 + 2x16 + 2x4), so few shapes are ever compiled and a
# remainder takes at most 3 calls per size (ChatRWKV prefills in chunks of 256 likewise).
# powers of two: a prompt runs as at most one chunk of each size below 1024 (a chunk reads
# every weight once, so on a CPU short chunks cost about as much as long ones)
PREFILL_SIZES = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)

# A short call from the empty state (state None, no resets) whose length is not itself a
# chunk size runs as ONE chunk of the next size up: the tokens are left-padded and a reset
# at the first real token gives it the empty state (exact, as for packed documents). At these
# lengths a chunk costs about one read of every weight, whatever its length, so one padded
# chunk beats the 2-6 greedy ones (a 14-token prompt: 16 instead of 8 + 4 + 2) and compiles,
# or loads from the persistent cache, one program instead of several.
PAD_UP_TO = 64


def padded_length(n: int) -> int | None:
    """The single chunk an ``n``-token call from the empty state is left-padded to, or None
    (it runs as :func:`prefill_chunks`)."""
    if n < 1 or n > PAD_UP_TO or n in PREFILL_SIZES:
        return None
    return min(size for size in PREFILL_SIZES if size >= n)


def prefill_chunks(n: int) -> list[int]:
    """The chunk lengths an eager call of ``n`` tokens runs as (greedy over PREFILL_SIZES)."""
    sizes = []
    for size in PREFILL_SIZES:
        sizes += [size] * (n // size)
        n %= size
    return sizes

class Embedding(Module):
    """Token embedding ``weight [V, C]`` (official ``emb.weight``)."""

    def __init__(self, cfg: RWKVConfig, *, rngs: nnx.Rngs):
        # v4neo/v5+/v7: uniform ±1e-4 ("SmallInitEmb"; ln0 follows)
        self.weight = nnx.Param(uniform(host_rng(rngs), (cfg.vocab_size, cfg.n_embd), 1e-4,
                                        cfg.param_jnp_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(F32)


class Block(Module):
    """Pre-LN residual block: ``x += att(ln1(x)); x += ffn(ln2(x))``; layer 0 owns ``ln0``."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
        spec = cfg.spec
        pd = cfg.param_jnp_dtype
        if layer_id == 0:
            self.ln0 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.ln1 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.ln2 = LayerNorm(cfg.n_embd, cfg.ln_eps, pd)
        self.att = spec.time_mix(cfg, layer_id, rngs=rngs)
        self.ffn = spec.channel_mix(cfg, layer_id, rngs=rngs)

    def __call__(self, x, state: LayerState, v_first=None, resets=None):
        """x: [B, T, C] float32 residual stream -> (x, new LayerState, v_first); ``resets``:
        bool [B, T] document starts or None (see the module docstring)."""
        att_out, att_prev, wkv, v_first = self.att(self.ln1(x), state.att_x_prev, state.wkv,
                                                   v_first, resets)
        x = x + att_out.astype(F32)
        ffn_out, ffn_prev = self.ffn(self.ln2(x), state.ffn_x_prev, resets)
        x = x + ffn_out.astype(F32)
        return x, LayerState(att_prev, wkv, ffn_prev), v_first


class RWKV(Module):
    """An RWKV language model of any registered version, configured by :class:`RWKVConfig`.

    Build from scratch with the official initialisation: ``RWKV(cfg, rngs=nnx.Rngs(0))``;
    load an official checkpoint with :func:`rwkv_jax.load`. Call it as
    ``logits, state = model(tokens, state=None, *, logits_to_keep=0, resets=None)`` (see
    :meth:`__call__`
    and the module docstring for what is compiled when).
    """

    def __init__(self, cfg: RWKVConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd, V, C = cfg.param_jnp_dtype, cfg.vocab_size, cfg.n_embd
        self.emb = Embedding(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_out = LayerNorm(C, cfg.ln_eps, pd)
        gain = 0.5 * (V / C) ** 0.5 if V > C else 0.5
        self.head = Linear(C, V, init=orthogonal(host_rng(rngs), (V, C), gain, pd),
                           compute_dtype=cfg.compute_jnp_dtype)

    def init_state(self, batch_size: int) -> RWKVState:
        """The empty state for ``batch_size`` sequences (all float32)."""
        return init_state(self.config, batch_size)

    def hidden(self, tokens: jax.Array, state: RWKVState | None = None,
               resets: jax.Array | None = None):
        """Final residual stream after ``ln_out``: ([B, T, C] float32, new state);
        ``resets`` as in :meth:`__call__`.

        Traced inline (no jit of its own): for use inside the caller's jitted function."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        _check_resets(resets, tokens.shape)
        if state is None:
            state = self.init_state(tokens.shape[0])
        if len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.blocks)}")
        x = self.emb(tokens)
        x = self.blocks[0].ln0(x)
        new_state, v_first = [], None
        for block, layer_state in zip(self.blocks, state):
            x, layer_state, v_first = block(x, layer_state, v_first, resets)
            new_state.append(layer_state)
        return self.ln_out(x), tuple(new_state)

    def forward(self, tokens: jax.Array, state: RWKVState | None = None, *,
                logits_to_keep: int | None = 0, resets: jax.Array | None = None):
        """The traced computation of :meth:`__call__` for one chunk (no chunking, no jit of
        its own). ``logits_to_keep=None`` skips the head and returns ``(None, state)``."""
        h, state = self.hidden(tokens, state, resets)
        if logits_to_keep is None:
            return None, state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h).astype(F32), state

    def __call__(self, tokens: jax.Array, state: RWKVState | None = None, *,
                 logits_to_keep: int = 0, resets: jax.Array | None = None):
        """tokens [B, T] int -> (logits [B, T', V] float32, state after the last token).

        ``state``: as returned by an earlier call or :meth:`init_state`; None = empty.
        ``logits_to_keep`` (Hugging Face's convention): 0 = logits at every position
        (T' = T); n > 0 = only the last n positions (T' = min(n, T)), and the head is
        computed for those alone (prefill then skips ~30% of a small model's FLOPs).
        ``resets``: None, or bool [B, T] like ``tokens``, True where a document starts (it
        sees the empty state; the returned state is then the last document's alone).
        """
        keep = _check_keep(logits_to_keep)
        moduledef, values = functional.split(self)
        leaves = [tokens, resets, values[0] if values else None,
                  *(jax.tree.leaves(state)[:1] if state is not None else ())]
        if functional.under_trace(*leaves):
            return self.forward(tokens, state, logits_to_keep=keep, resets=resets)
        return _eager_call(self, moduledef, values, tokens, state, keep, resets)


def abstract_model(cfg: RWKVConfig) -> RWKV:
    """``cfg``'s model with ``jax.ShapeDtypeStruct`` values in place of arrays: its structure,
    names, shapes and dtypes, built with no initialisation work (``nnx.eval_shape`` inside
    :func:`~rwkv_jax.model.layers.shapes_only`). Fill it with ``Variable.set_value`` and
    ``nnx.merge``, as :func:`rwkv_jax.checkpoint.model_from_tensors` does."""
    with shapes_only():
        return nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))


def _check_resets(resets, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``resets`` is None or a bool array of ``shape`` (the tokens'
    [B, T]); checks shape and dtype only, so it costs nothing under a trace."""
    if resets is None:
        return
    got_shape, got_dtype = np.shape(resets), getattr(resets, "dtype", None)
    if tuple(got_shape) != tuple(shape) or got_dtype != np.bool_:
        raise ValueError(f"resets must be bool [B, T] like tokens {tuple(shape)}, got "
                         f"{got_dtype if got_dtype is not None else type(resets).__name__} "
                         f"{tuple(got_shape)}")


def _check_keep(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"logits_to_keep must be an integer >= 0 (0 = every position), "
                         f"got {n!r}")
    return int(n)


def init_state(cfg: RWKVConfig, batch_size: int) -> RWKVState:
    """The empty state of ``cfg``'s model for ``batch_size`` sequences (float32). Built from
    ``jnp.zeros``/``jnp.full``: eagerly each shape compiles once; traced, it is inline."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    zeros = jnp.zeros((int(batch_size), cfg.n_embd), jnp.float32)
    return tuple(LayerState(zeros, cfg.spec.time_mix.init_state(cfg, int(batch_size)), zeros)
                 for _ in range(cfg.n_layer))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(moduledef: functional.ModuleDef, values, tokens, state, keep, resets=None):
    """One chunk of an eager call: the model rebuilt from its arrays, run, jitted
    (``resets`` None is an empty pytree: its own program, with no reset ops)."""
    return moduledef.merge(values).forward(tokens, state, logits_to_keep=keep, resets=resets)


@functools.lru_cache(maxsize=256)
def state_spec(cfg: RWKVConfig, batch_size: int):
    """``(treedef, leaf shapes)`` of :func:`init_state` (computed abstractly, cached)."""
    abstract = jax.eval_shape(lambda: init_state(cfg, batch_size))
    leaves, treedef = jax.tree.flatten(abstract)
    return treedef, tuple(x.shape for x in leaves)


def check_state(cfg: RWKVConfig, state, batch_size: int) -> None:
    """Raise ValueError unless ``state`` has the structure and shapes of
    ``init_state(cfg, batch_size)``."""
    treedef, shapes = state_spec(cfg, batch_size)
    leaves, got = jax.tree.flatten(state)
    if got != treedef or tuple(np.shape(x) for x in leaves) != shapes:
        raise ValueError(f"state does not fit this model and batch {batch_size}: expected "
                         f"the structure and shapes of init_state({batch_size}) (first leaves "
                         f"{list(shapes[:3])}), got {got.num_leaves} leaves, first "
                         f"{[np.shape(x) for x in leaves[:3]]}")


def _eager_call(model: RWKV, moduledef, values, tokens, state, keep: int, resets=None):
    """``model(tokens, state)`` outside any trace: validated on the host, then run chunk by
    chunk (:func:`prefill_chunks`) through the cached :func:`_apply`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise ValueError(f"tokens must have at least one row and one position, got shape "
                         f"{tokens.shape}")
    V = model.config.vocab_size
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token ids must be in 0..{V - 1}, got {lo if lo < 0 else hi}")
    tokens = tokens.astype(np.int32)
    if resets is not None:
        resets = np.asarray(resets)
        _check_resets(resets, tokens.shape)
    pad = padded_length(T) if state is None and resets is None else None
    if state is None:
        state = model.init_state(B)
    else:
        check_state(model.config, state, B)
    if pad is not None:
        return _padded_call(moduledef, values, tokens, state, keep, pad)
    first_kept = 0 if keep == 0 else T - min(keep, T)
    parts, pos = [], 0
    for size in prefill_chunks(T):
        end = pos + size
        n_kept = end - max(pos, first_kept)
        chunk_keep = None if n_kept <= 0 else 0 if n_kept == size else n_kept
        chunk_resets = None if resets is None else resets[:, pos:end]
        logits, state = _apply(moduledef, values, tokens[:, pos:end], state, chunk_keep,
                               chunk_resets)
        if logits is not None:
            parts.append(logits)
        pos = end
    if len(parts) == 1:
        return parts[0], state
    # assembled on the host: a device-side concatenate would compile once per new length
    return jnp.asarray(np.concatenate([np.asarray(p) for p in parts], axis=1)), state


def _padded_call(moduledef, values, tokens: np.ndarray, state, keep: int, size: int):
    """:func:`_eager_call` of a short call from the empty ``state`` as one chunk of ``size``
    (:func:`padded_length`): ``size - T`` pad tokens (id 0) before the T real ones, a reset at
    the first real one, the pad positions' logits dropped."""
    B, T = tokens.shape
    pad = size - T
    padded = np.zeros((B, size), np.int32)
    padded[:, pad:] = tokens
    resets = np.zeros((B, size), np.bool_)
    resets[:, pad] = True
    return _apply(moduledef, values, padded, state, min(keep, T) if keep else T, resets)
