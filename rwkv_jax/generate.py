"""Sampling and generation, as ChatRWKV does it, with jitted prefill and decode.

* The model is split once per call (``nnx.split``) and run as ``jax.jit`` of pure functions
  of ``(params, ...)``; the compiled functions are cached per model structure
  (:func:`compiled_fns`), so a second ``generate`` call on the same model compiles nothing.
  (``nnx.jit`` would re-walk the module graph on every decode step, ~ms each.)
* Prefill runs the prompt in chunks of :data:`PREFILL_CHUNK` tokens, the remainder in
  pieces of 64, 16, 4 and 1 (:data:`PREFILL_SIZES`; an RWKV state continues exactly), so at
  most 5 prompt shapes are ever compiled and a remainder takes at most 12 calls. Prompts of
  different lengths in a batch are prefilled one by one and their states
  stacked (an RWKV state is exact per row; padding would pollute it).
* Decoding is one jitted step over fixed shapes; every sampling setting except "greedy or
  not" is a traced value, so the step compiles once per (model, batch size, greedy) and is
  reused for every token and every later call.
* Sampling (ChatRWKV ``sample_logits``): softmax, top-p cut at the first probability whose
  cumulative sum reaches ``top_p``, optional top-k, then ``probs ** (1/temperature)``;
  temperature 0 is greedy. Presence/frequency penalties subtract
  ``presence + frequency·count`` from the logits of tokens generated so far, and the counts
  decay by ``penalty_decay`` every step (ChatRWKV's chat demo). Banned tokens get -inf.
* Row ``i`` of a batch samples with seed ``seed + i`` (its randomness depends only on that
  seed and the step), so prompt ``i`` in a batch gives the same text as alone with
  ``seed + i``, and repeated prompts in one batch give different samples.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32
PREFILL_CHUNK = 256  # ChatRWKV's chunk_len
# Prompt chunk lengths: few compiled shapes, at most 3 calls per smaller size
PREFILL_SIZES = (PREFILL_CHUNK, 64, 16, 4, 1)

__all__ = [
    "PREFILL_CHUNK",
    "PREFILL_SIZES",
    "Sampling",
    "compiled_fns",
    "generate",
    "generate_tokens",
    "prefill",
    "sample_logits",
    "stream",
    "stream_with_state",
]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings (ChatRWKV defaults where they exist).

    temperature: 0 = greedy (argmax); otherwise ``probs ** (1/temperature)`` after the cuts.
    top_p: keep the most probable tokens whose cumulative probability reaches ``top_p``.
    top_k: keep at most the ``top_k`` most probable tokens (0 = no limit).
    presence_penalty, frequency_penalty, penalty_decay: see the module docstring.
    banned_tokens: ids that are never generated.
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996
    banned_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.penalty_decay <= 1:
            raise ValueError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        object.__setattr__(self, "banned_tokens", tuple(int(t) for t in self.banned_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class _SamplingArrays(NamedTuple):
    """:class:`Sampling` as traced values (changing them never recompiles)."""

    temperature: jax.Array   # f32 []
    top_p: jax.Array         # f32 []
    top_k: jax.Array         # int32 []
    presence: jax.Array      # f32 []
    frequency: jax.Array     # f32 []
    decay: jax.Array         # f32 []
    banned: jax.Array        # bool [V]


def _sampling_arrays(s: Sampling, vocab_size: int) -> _SamplingArrays:
    bad = [t for t in s.banned_tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"banned token ids out of range 0..{vocab_size - 1}: {bad}")
    banned = np.zeros(vocab_size, bool)
    banned[list(s.banned_tokens)] = True
    return _SamplingArrays(
        jnp.asarray(max(s.temperature, 1e-6), F32), jnp.asarray(s.top_p, F32),
        jnp.asarray(s.top_k, jnp.int32), jnp.asarray(s.presence_penalty, F32),
        jnp.asarray(s.frequency_penalty, F32), jnp.asarray(s.penalty_decay, F32),
        jnp.asarray(banned))


def _sample(logits: jax.Array, keys: jax.Array, sp: _SamplingArrays, greedy: bool) -> jax.Array:
    """One token per row of ``logits`` [B, V] f32; row ``b`` draws with ``keys[b]``."""
    logits = jnp.where(sp.banned[None, :], -jnp.inf, logits.astype(F32))
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
    cum = jnp.cumsum(sorted_p, axis=-1)
    reached = cum >= sp.top_p
    # the probability at which the cumulative sum first reaches top_p: keep all >= it (if
    # rounding keeps the sum below top_p = 1, keep everything)
    idx = jnp.where(reached.any(axis=-1), jnp.argmax(reached, axis=-1), V - 1)
    cutoff = jnp.take_along_axis(sorted_p, idx[:, None], axis=-1)
    probs = jnp.where(probs < cutoff, 0.0, probs)
    kth = sorted_p[:, jnp.clip(sp.top_k, 1, V) - 1][:, None]
    probs = jnp.where((sp.top_k > 0) & (probs < kth), 0.0, probs)
    # probs ** (1/T), renormalised by categorical: log(probs) / T
    logp = jnp.log(probs) / sp.temperature
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def sample_logits(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row from logits [B, V] (float32); greedy when temperature is 0.

    ``key`` is split into one key per row."""
    logits = jnp.asarray(logits)
    keys = jax.random.split(key, logits.shape[0])
    return _sample(logits, keys, _sampling_arrays(s, logits.shape[-1]), s.greedy)


# ---- compiled functions ------------------------------------------------------------------
class CompiledFns(NamedTuple):
    """The jitted pure functions for one model structure (see :func:`compiled_fns`)."""

    prefill: Callable   # (params, tokens [B, T], state) -> (last logits [B, V], state)
    decode: Callable    # (params, logits, state, counts, seeds, step, active, sp, greedy=)


@functools.lru_cache(maxsize=16)
def compiled_fns(graphdef) -> CompiledFns:
    """Jitted prefill and decode step for models with this ``nnx`` graphdef (cached)."""

    def prefill_fn(params, tokens, state):
        logits, state = nnx.merge(graphdef, params)(tokens, state)
        return logits[:, -1], state

    def decode_fn(params, logits, state, counts, seeds, step, active, sp: _SamplingArrays, *,
                  greedy: bool):
        """Sample from ``logits`` [B, V] (row b with seed ``seeds[b]``), feed the token; rows
        not ``active`` keep their state."""
        penalised = logits - (sp.presence * (counts > 0).astype(F32) + sp.frequency * counts)
        keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds)
        tok = _sample(penalised, keys, sp, greedy)
        counts = counts * sp.decay
        counts = counts.at[jnp.arange(tok.shape[0]), tok].add(jnp.float32(1.0))
        new_logits, new_state = nnx.merge(graphdef, params)(tok[:, None], state)

        def keep(new, old):
            return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return tok, new_logits[:, -1], jax.tree.map(keep, new_state, state), counts

    return CompiledFns(jax.jit(prefill_fn), jax.jit(decode_fn, static_argnames=("greedy",)))


def _prefill_chunks(n: int) -> list[int]:
    """Chunk lengths for a prompt of ``n`` tokens: greedy over :data:`PREFILL_SIZES`."""
    sizes = []
    for size in PREFILL_SIZES:
        sizes += [size] * (n // size)
        n %= size
    return sizes


def _prefill(fns: CompiledFns, params, model, prompts: Sequence[Sequence[int]], state):
    rows_logits, rows_state = [], []
    for i, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("a prompt must contain at least one token")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids out of range 0..{model.config.vocab_size - 1}"
                             f": {bad[:10]}")
        row = (model.init_state(1) if state is None
               else jax.tree.map(lambda s, i=i: s[i:i + 1], state))
        pos = 0
        for size in _prefill_chunks(len(ids)):
            logits, row = fns.prefill(params, jnp.asarray([ids[pos:pos + size]], jnp.int32), row)
            pos += size
        rows_logits.append(logits)
        rows_state.append(row)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows_state)
    return jnp.concatenate(rows_logits, axis=0), stacked


def _check_state(model, state, batch: int):
    if state is None:
        return None
    want = model.init_state(batch)
    got_shapes = jax.tree.map(jnp.shape, state)
    if jax.tree.structure(state) != jax.tree.structure(want) or got_shapes != jax.tree.map(
            jnp.shape, want):
        ref = jax.tree.leaves(state)
        b = ref[0].shape[0] if ref and getattr(ref[0], "ndim", 0) else None
        if b == 1 and batch > 1:  # one state for every prompt
            return jax.tree.map(lambda s: jnp.repeat(s, batch, axis=0), state)
        raise ValueError(f"state does not fit this model and {batch} prompt(s): expected the "
                         f"structure of model.init_state({batch})")
    return state


def prefill(model, prompts: Sequence[Sequence[int]], state=None):
    """Run each prompt through the model; returns (last logits [B, V], stacked state).

    ``state`` (optional) is the batched state to continue from (batch 1 is repeated).
    """
    graphdef, params = nnx.split(model)
    state = _check_state(model, state, len(prompts))
    return _prefill(compiled_fns(graphdef), params, model, prompts, state)


class _Decoder:
    """The decode loop shared by :func:`generate_tokens` and :func:`stream`."""

    def __init__(self, model, prompts, sampling: Sampling, seed: int, state):
        graphdef, self.params = nnx.split(model)
        self.fns = compiled_fns(graphdef)
        state = _check_state(model, state, len(prompts))
        self.logits, self.state = _prefill(self.fns, self.params, model, prompts, state)
        self.counts = jnp.zeros(self.logits.shape, F32)
        self.seeds = jnp.asarray([(seed + i) % (1 << 32) for i in range(len(prompts))],
                                 jnp.uint32)
        self.sp = _sampling_arrays(sampling, self.logits.shape[-1])
        self.greedy = sampling.greedy
        self.step = 0

    def next(self, active: np.ndarray) -> np.ndarray:
        tok, self.logits, self.state, self.counts = self.fns.decode(
            self.params, self.logits, self.state, self.counts, self.seeds,
            jnp.asarray(self.step, jnp.int32), jnp.asarray(active, jnp.bool_), self.sp,
            greedy=self.greedy)
        self.step += 1
        return np.asarray(tok)


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                    sampling: Sampling = Sampling(), seed: int = 0,
                    state=None) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(tokens [B] int32, state)`` after each generated token, for every prompt.

    The state yielded with a token already includes that token.
    """
    dec = _Decoder(model, prompts, sampling, seed, state)
    active = np.ones(len(prompts), bool)
    for _ in range(max_tokens):
        tok = dec.next(active)
        yield tok, dec.state


def stream_with_state(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100,
                      seed: int = 0, stop: Sequence[str] = (),
                      stop_tokens: Sequence[int] | None = None, state=None,
                      sampling: Sampling = Sampling()) -> Iterator[tuple[list[str], Any]]:
    """:func:`stream`, yielding ``(chunks, state)``: the state after every token so far (a
    finished row keeps the state it had when it finished)."""
    from rwkv_jax.tokenizers import StreamDecoder
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings")
    if stop_tokens is None:
        eot = getattr(tokenizer, "EOT", None)
        stop_tokens = () if eot is None else (eot,)
    stop_tokens = {int(t) for t in stop_tokens}
    stop = [x for x in stop if x]
    ids = [tokenizer.encode(p) for p in prompts]
    n = len(prompts)
    dec = _Decoder(model, ids, sampling, seed, state)
    decoders = [StreamDecoder(tokenizer) for _ in range(n)]
    texts, emitted = [""] * n, [0] * n
    active = np.ones(n, bool)
    hold = max((len(x) for x in stop), default=1) - 1  # chars that may start a stop string

    def cut_at_stop(i: int) -> bool:
        found = [j for j in (texts[i].find(x, emitted[i]) for x in stop) if j >= 0]
        if found:
            texts[i] = texts[i][:min(found)]
        return bool(found)

    for _ in range(max_tokens):
        toks = dec.next(active)
        chunk = [""] * n
        for i in range(n):
            if not active[i]:
                continue
            t = int(toks[i])
            if t in stop_tokens:
                texts[i] += decoders[i].flush()
                cut_at_stop(i)
                active[i] = False
                safe = len(texts[i])
            else:
                texts[i] += decoders[i].feed([t])
                if cut_at_stop(i):
                    active[i] = False
                    safe = len(texts[i])
                else:
                    safe = max(emitted[i], len(texts[i]) - hold)
            chunk[i] = texts[i][emitted[i]:safe]
            emitted[i] = safe
        yield chunk, dec.state
        if not active.any():
            return
    chunk = [""] * n
    for i in range(n):
        if active[i]:
            texts[i] += decoders[i].flush()
            cut_at_stop(i)
            chunk[i] = texts[i][emitted[i]:]
    yield chunk, dec.state


def stream(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100, seed: int = 0,
           stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None, state=None,
           **sampling) -> Iterator[list[str]]:
    """Yield, per step, the newly completed text of each prompt (whole UTF-8 characters only).

    Generation of a row ends at a stop string (not included), at a token in ``stop_tokens``
    (default: the tokenizer's end-of-text id, e.g. 0 for World; none for bytes) or after
    ``max_tokens``. ``sampling``: the fields of :class:`Sampling`. ``state`` continues from a
    saved state (batch ``len(prompts)``, or 1 for all prompts).
    """
    for chunk, _ in stream_with_state(model, tokenizer, prompts, max_tokens=max_tokens,
                                      seed=seed, stop=stop, stop_tokens=stop_tokens,
                                      state=state, sampling=Sampling(**sampling)):
        yield chunk


def generate(model, tokenizer, prompt: str, *, max_tokens: int = 100, seed: int = 0,
             stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None, state=None,
             return_state: bool = False, **sampling):
    """Generate text continuing ``prompt`` (the prompt is not included in the result).

    ``sampling``: the fields of :class:`Sampling` (``temperature=0`` is greedy). With
    ``return_state=True`` returns ``(text, state)``: the state after the prompt and every
    generated token (including the one that completed a stop string), ready to continue,
    e.g. with the next chat turn as ``prompt`` and ``state=state``.
    """
    out, final = [], state
    for chunk, final in stream_with_state(model, tokenizer, [prompt], max_tokens=max_tokens,
                                          seed=seed, stop=stop, stop_tokens=stop_tokens,
                                          state=state, sampling=Sampling(**sampling)):
        out.append(chunk[0])
    text = "".join(out)
    return (text, final) if return_state else text
