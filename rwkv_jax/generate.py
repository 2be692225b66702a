"""Sampling and generation, as ChatRWKV does it, with batched prefill and decode.

* Prefill is the model's own call, ``model(tokens, state, logits_to_keep=1)``: the prompt runs
  in the fixed chunk lengths of :data:`rwkv_jax.model.lm.PREFILL_SIZES` (the state carried
  between them, exact for a recurrence), and the head is computed for the last position only.
  Prompts of equal length prefill together as one batch; a prompt repeated for several
  samples (``num_samples``) is prefilled once and its state copied.
* Decoding is one jitted step over every stream at once (:func:`decode_step`): sample, feed
  the token, keep the last logits. Every sampling setting is a traced per-row value, so the
  step compiles once per (model, batch size, all-greedy or not, any penalty or not) and is
  reused for every token and every later call. On a CPU a step is bound by reading the
  weights, so B streams cost little more than one.
* Sampling (ChatRWKV ``sample_logits``), per stream: softmax, top-p cut at the first
  probability whose cumulative sum reaches ``top_p``, optional top-k, then
  ``probs ** (1/temperature)``; temperature 0 is greedy. Presence/frequency penalties subtract
  ``presence + frequency·count`` from the logits of tokens generated so far, and the counts
  decay by ``penalty_decay`` every step (ChatRWKV's chat demo). Banned tokens get -inf.
* Row ``i`` of a batch samples with seed ``seed + i`` (its randomness depends only on that
  seed and the step), so prompt ``i`` in a batch gives the same text as alone with
  ``seed + i``, and repeated prompts in one batch give different samples.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.model import functional
from rwkv_jax.model.lm import PREFILL_SIZES, check_state

F32 = jnp.float32
PREFILL_CHUNK = PREFILL_SIZES[0]

__all__ = [
    "PREFILL_CHUNK",
    "PREFILL_SIZES",
    "Sampling",
    "decode_step",
    "generate",
    "generate_tokens",
    "prefill",
    "sample_logits",
    "stream",
    "stream_with_state",
]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings of one stream (ChatRWKV defaults where they exist).

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
        def finite(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                     "penalty_decay"):
            finite(name)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) \
                or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 <= self.penalty_decay <= 1:
            raise ValueError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        object.__setattr__(self, "banned_tokens", tuple(int(t) for t in self.banned_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingArrays(NamedTuple):
    """Per-stream :class:`Sampling` values as traced arrays (changing them never recompiles)."""

    temperature: jax.Array   # f32 [B] (0 = greedy)
    top_p: jax.Array         # f32 [B]
    top_k: jax.Array         # int32 [B]
    presence: jax.Array      # f32 [B]
    frequency: jax.Array     # f32 [B]
    decay: jax.Array         # f32 [B]
    banned: jax.Array        # bool [B, V]


def sampling_arrays(samplings: Sequence[Sampling], vocab_size: int) -> SamplingArrays:
    """Stack one :class:`Sampling` per stream into :class:`SamplingArrays`."""
    banned = np.zeros((len(samplings), vocab_size), bool)
    for i, s in enumerate(samplings):
        bad = [t for t in s.banned_tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"banned token ids out of range 0..{vocab_size - 1}: {bad}")
        banned[i, list(s.banned_tokens)] = True

    def col(name, dtype=np.float32):
        return jnp.asarray(np.array([getattr(s, name) for s in samplings], dtype))

    return SamplingArrays(col("temperature"), col("top_p"), col("top_k", np.int32),
                          col("presence_penalty"), col("frequency_penalty"),
                          col("penalty_decay"), jnp.asarray(banned))


# nucleus / top-k cut-offs read the most probable NUCLEUS_PREFIX tokens of each row (a
# partial sort, lax.top_k). A nucleus that reaches past them (a flat distribution) is found by
# bisection on the probability instead (32 masked sums over the row); only a top_k above
# NUCLEUS_PREFIX sorts the whole vocabulary. The cut-offs are the same either way.
NUCLEUS_PREFIX = 256


def _prefix_cutoffs(sorted_p: jax.Array, sp: SamplingArrays):
    """From each row's most probable probabilities in descending order (``sorted_p`` [B, n],
    a prefix of the sorted row or all of it): ``(found [B], cutoff [B, 1], kth [B, 1])``.
    ``cutoff``: the probability at which the cumulative sum first reaches ``top_p`` (keep all
    >= it; if rounding keeps the sum of everything below top_p = 1, keep everything; valid
    where ``found``, i.e. the sum reaches top_p within the prefix, or the prefix is the whole
    row); ``kth``: the ``top_k``-th probability (valid where top_k <= n)."""
    n = sorted_p.shape[-1]
    reached = jnp.cumsum(sorted_p, axis=-1) >= sp.top_p[:, None]
    found = reached.any(axis=-1)
    idx = jnp.where(found, jnp.argmax(reached, axis=-1), n - 1)
    cutoff = jnp.take_along_axis(sorted_p, idx[:, None], axis=-1)
    kth = jnp.take_along_axis(sorted_p, (jnp.clip(sp.top_k, 1, n) - 1)[:, None], axis=-1)
    return found, cutoff, kth


def _bisect_cutoff(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """The nucleus cut-off of each row of ``probs`` [B, V] (>= 0) without sorting: the largest
    ``c`` with ``sum(probs[probs >= c]) >= top_p``, which is one of the row's probabilities
    (the one at which the descending cumulative sum reaches top_p), or 0 where even the whole
    row sums below top_p. Bisection on the float32 bit patterns (ordered like the values for
    non-negative floats), 32 masked row sums; returns [B, 1]."""
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(probs.shape[:1], jnp.int32)           # S(lo) >= top_p, or lo = 0
    hi = jnp.max(bits, axis=-1) + 1                      # S(hi) = 0 < top_p

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def _sample(logits: jax.Array, keys: jax.Array, sp: SamplingArrays, greedy: bool) -> jax.Array:
    """One token per row of ``logits`` [B, V] f32; row ``b`` draws with ``keys[b]`` and its
    own settings; ``greedy`` (static) = every row has temperature 0 (argmax only)."""
    logits = jnp.where(sp.banned, -jnp.inf, logits.astype(F32))
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    V = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    if V > NUCLEUS_PREFIX:
        found, cutoff, kth = _prefix_cutoffs(jax.lax.top_k(probs, NUCLEUS_PREFIX)[0], sp)
        cutoff = jax.lax.cond(
            found.all(), lambda: cutoff,
            lambda: jnp.where(found[:, None], cutoff, _bisect_cutoff(probs, sp.top_p)))
        kth = jax.lax.cond(
            (sp.top_k <= NUCLEUS_PREFIX).all(), lambda: kth,
            lambda: _prefix_cutoffs(-jnp.sort(-probs, axis=-1), sp)[2])
    else:
        _, cutoff, kth = _prefix_cutoffs(-jnp.sort(-probs, axis=-1), sp)
    probs = jnp.where(probs < cutoff, 0.0, probs)
    probs = jnp.where((sp.top_k[:, None] > 0) & (probs < kth), 0.0, probs)
    # probs ** (1/T), renormalised by categorical: log(probs) / T
    temp = jnp.maximum(sp.temperature, 1e-6)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, jnp.log(probs) / temp).astype(jnp.int32)
    return jnp.where(sp.temperature == 0, argmax, drawn)


def sample_logits(logits: jax.Array, key: jax.Array, s: Sampling | Sequence[Sampling]) -> jax.Array:
    """One token id per row from logits [B, V] (float32); greedy where temperature is 0.

    ``s``: one :class:`Sampling` for every row, or one per row. ``key`` is split into one key
    per row."""
    logits = jnp.asarray(logits)
    samplings = _per_row(s, logits.shape[0])
    keys = jax.random.split(key, logits.shape[0])
    return _sample(logits, keys, sampling_arrays(samplings, logits.shape[-1]),
                   all(x.greedy for x in samplings))


def _per_row(s: Sampling | Sequence[Sampling], n: int) -> list[Sampling]:
    if isinstance(s, Sampling):
        return [s] * n
    s = list(s)
    if len(s) != n or not all(isinstance(x, Sampling) for x in s):
        raise ValueError(f"sampling: expected one Sampling or a list of {n} (one per stream), "
                         f"got {len(s)} item(s)")
    return s


# ---- compiled step ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("moduledef", "greedy"), donate_argnums=(2, 4))
def decode_step(moduledef: functional.ModuleDef, values, logits, state, counts, seeds, step,
                active, sp: SamplingArrays, *, greedy: bool):
    """Sample one token per stream from ``logits`` [B, V] (row b with seed ``seeds[b]`` at
    ``step``), feed it, return ``(tokens [B], next logits [B, V], state, counts)``. Rows not
    ``active`` keep their state. ``moduledef, values``: :func:`rwkv_jax.model.functional.split`
    of the model.

    ``counts`` [B, V] (the decayed token counts the penalties read) or None: no stream has a
    presence or frequency penalty, and nothing is counted (a [B, V] pass less per step).
    ``logits`` and ``counts`` are donated (their buffers become the outputs'); ``state`` is
    not, since callers hand each step's state out."""
    if counts is not None:
        logits = logits - (sp.presence[:, None] * (counts > 0).astype(F32)
                           + sp.frequency[:, None] * counts)
    keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds)
    tok = _sample(logits, keys, sp, greedy)
    if counts is not None:
        counts = counts * sp.decay[:, None]
        counts = counts.at[jnp.arange(tok.shape[0]), tok].add(jnp.float32(1.0))
    new_logits, new_state = moduledef.merge(values).forward(tok[:, None], state,
                                                           logits_to_keep=1)

    def keep(new, old):
        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return tok, new_logits[:, -1], jax.tree.map(keep, new_state, state), counts


# ---- prefill ---------------------------------------------------------------------------------
def _rows(tree, idx: np.ndarray):
    """Rows ``idx`` of every leaf, gathered on the host (a device gather would compile once
    per new batch composition; states are small next to the weights)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[idx]), tree)


def _stack_rows(parts: list[tuple[np.ndarray, Any]], n: int):
    """Trees of rows ``(row indices, tree)`` -> one tree of ``n`` rows in index order."""
    idx, trees = zip(*parts)
    order = np.argsort(np.concatenate(idx))
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate([np.asarray(x) for x in xs])[order]),
                        *trees)


def _check_prompt(i: int, ids, vocab_size: int) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError(f"prompt {i}: a prompt must contain at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {i}: token ids out of range 0..{vocab_size - 1}: {bad[:10]}")
    return ids


def _batch_state(model, state, batch: int):
    """``state`` checked for ``batch`` rows; a batch-1 state is repeated for every row."""
    if state is None:
        return None
    leaves = jax.tree.leaves(state)
    if batch > 1 and leaves and np.shape(leaves[0])[0] == 1:
        state = _rows(state, np.zeros(batch, np.int64))
    check_state(model.config, state, batch)
    return state


def prefill(model, prompts: Sequence[Sequence[int]], state=None):
    """Run each prompt (token ids) through the model: ``(last logits [B, V], state)``.

    ``state`` (optional) is the batched state to continue from (a batch-1 state serves every
    prompt). Prompts of one length run together; identical prompts from the same state run
    once. Exact: each row's result is that of running its prompt alone."""
    V = model.config.vocab_size
    prompts = [_check_prompt(i, p, V) for i, p in enumerate(prompts)]
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    state = _batch_state(model, state, n)
    if state is None:  # identical prompts need one prefill (with a state, rows may differ)
        uniq: dict[tuple[int, ...], int] = {}
        first = np.array([uniq.setdefault(tuple(p), i) for i, p in enumerate(prompts)])
        if len(uniq) < n:
            logits, st = prefill(model, [prompts[i] for i in uniq.values()])
            where = np.searchsorted(np.array(list(uniq.values())), first)
            return _rows(logits, where), _rows(st, where)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    parts = []
    for rows in groups.values():
        idx = np.asarray(rows)
        tokens = np.asarray([prompts[i] for i in rows], np.int32)
        st = None if state is None else (state if len(rows) == n else _rows(state, idx))
        logits, st = model(tokens, st, logits_to_keep=1)
        parts.append((idx, (logits[:, -1], st)))
    if len(parts) == 1:
        return parts[0][1]
    return _stack_rows(parts, n)


class _Decoder:
    """The decode loop shared by :func:`generate_tokens` and :func:`stream_with_state`."""

    def __init__(self, model, prompts, samplings: Sequence[Sampling], seed: int, state):
        self.logits, self.state = prefill(model, prompts, state)
        self.moduledef, self.values = functional.split(model)
        penalised = any(s.presence_penalty or s.frequency_penalty for s in samplings)
        self.counts = jnp.zeros(self.logits.shape, F32) if penalised else None
        self.seeds = jnp.asarray([(seed + i) % (1 << 32) for i in range(len(prompts))],
                                 jnp.uint32)
        self.sp = sampling_arrays(samplings, self.logits.shape[-1])
        self.greedy = all(s.greedy for s in samplings)
        self.step = 0

    def next(self, active: np.ndarray) -> np.ndarray:
        tok, self.logits, self.state, self.counts = decode_step(
            self.moduledef, self.values, self.logits, self.state, self.counts, self.seeds,
            jnp.asarray(self.step, jnp.int32), jnp.asarray(active, jnp.bool_), self.sp,
            greedy=self.greedy)
        self.step += 1
        return np.asarray(tok)


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                    sampling: Sampling | Sequence[Sampling] = Sampling(), seed: int = 0,
                    state=None) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(tokens [B] int32, state)`` after each generated token, for every prompt
    (token ids). ``sampling``: one :class:`Sampling` for all streams or one per stream.

    The state yielded with a token already includes that token.
    """
    dec = _Decoder(model, prompts, _per_row(sampling, len(prompts)), seed, state)
    active = np.ones(len(prompts), bool)
    for _ in range(max_tokens):
        tok = dec.next(active)
        yield tok, dec.state


def _expand(prompts: Sequence[str], num_samples: int) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return [p for p in prompts for _ in range(num_samples)]


def stream_with_state(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100,
                      seed: int = 0, stop: Sequence[str] = (),
                      stop_tokens: Sequence[int] | None = None, state=None,
                      sampling: Sampling | Sequence[Sampling] = Sampling(),
                      num_samples: int = 1) -> Iterator[tuple[list[str], Any]]:
    """:func:`stream`, yielding ``(chunks, state)``: the state after every token so far (a
    finished row keeps the state it had when it finished)."""
    from rwkv_jax.tokenizers import StreamDecoder
    prompts = _expand(prompts, num_samples)
    if stop_tokens is None:
        eot = getattr(tokenizer, "EOT", None)
        stop_tokens = () if eot is None else (eot,)
    stop_tokens = {int(t) for t in stop_tokens}
    stop = [x for x in stop if x]
    ids = [tokenizer.encode(p) for p in prompts]
    n = len(prompts)
    dec = _Decoder(model, ids, _per_row(sampling, n), seed, state)
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
           num_samples: int = 1, sampling: Sampling | Sequence[Sampling] | None = None,
           **sampling_kw) -> Iterator[list[str]]:
    """Yield, per step, the newly completed text of each stream (whole UTF-8 characters only).

    Streams: each prompt ``num_samples`` times (prompt-major: stream ``i·n + j`` is sample j of
    prompt i), all decoded together in one batched step. Generation of a stream ends at a stop
    string (not included), at a token in ``stop_tokens`` (default: the tokenizer's end-of-text
    id, e.g. 0 for World; none for bytes) or after ``max_tokens``. Sampling: the fields of
    :class:`Sampling` as keywords (for every stream), or ``sampling=`` one Sampling or a list
    with one per stream. ``state`` continues from a saved state (batch = number of streams, or
    1 for all).
    """
    for chunk, _ in stream_with_state(model, tokenizer, prompts, max_tokens=max_tokens,
                                      seed=seed, stop=stop, stop_tokens=stop_tokens,
                                      state=state, num_samples=num_samples,
                                      sampling=_sampling_arg(sampling, sampling_kw)):
        yield chunk


def _sampling_arg(sampling, kw: dict):
    if sampling is not None and kw:
        raise TypeError(f"pass sampling settings either as sampling= or as keywords, not both "
                        f"({', '.join(kw)})")
    return Sampling(**kw) if sampling is None else sampling


def generate(model, tokenizer, prompt: str | Sequence[str], *, max_tokens: int = 100,
             seed: int = 0, stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
             state=None, return_state: bool = False, num_samples: int = 1,
             sampling: Sampling | Sequence[Sampling] | None = None, **sampling_kw):
    """Generate text continuing ``prompt`` (the prompt is not included in the result).

    ``prompt``: one string -> one string; a list of strings, or ``num_samples > 1`` -> a list
    with one completion per stream (prompt-major, see :func:`stream`), all decoded in one
    batch. Sampling: the fields of :class:`Sampling` as keywords (``temperature=0`` is
    greedy), or ``sampling=`` one Sampling or one per stream. With ``return_state=True``
    returns ``(text(s), state)``: the state after the prompt and every generated token
    (including the one that completed a stop string), ready to continue, e.g. with the next
    chat turn as ``prompt`` and ``state=state``.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    out, final = None, state
    for chunk, final in stream_with_state(model, tokenizer, prompts, max_tokens=max_tokens,
                                          seed=seed, stop=stop, stop_tokens=stop_tokens,
                                          state=state, num_samples=num_samples,
                                          sampling=_sampling_arg(sampling, sampling_kw)):
        out = chunk if out is None else [a + b for a, b in zip(out, chunk)]
    n = len(prompts) * num_samples
    texts = out if out is not None else [""] * n
    result = texts[0] if single and num_samples == 1 else texts
    return (result, final) if return_state else result
