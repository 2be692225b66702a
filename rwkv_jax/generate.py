"""Sampling and generation, as ChatRWKV does it, with jitted prefill and decode.

* The prompt is prefilled in one jitted call of the parallel form; prompts of different
  lengths in a batch are prefilled one by one and their states stacked (an RWKV state is
  exact per row; padding would pollute it).
* Decoding is one jitted step over a fixed-shape state and penalty table: compiled once,
  reused for every token.
* Sampling (ChatRWKV ``sample_logits``): softmax, top-p cut at the first probability whose
  cumulative sum reaches ``top_p``, optional top-k, then ``probs ** (1/temperature)``;
  temperature 0 is greedy. Presence/frequency penalties subtract
  ``presence + frequency·count`` from the logits of tokens generated so far, and the counts
  decay by ``penalty_decay`` every step (ChatRWKV's API demo).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings (ChatRWKV defaults where they exist)."""

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


def sample_logits(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row from logits [B, V] (float32); greedy when temperature is 0."""
    logits = logits.astype(F32)
    if s.banned_tokens:
        logits = logits.at[:, jnp.asarray(s.banned_tokens)].set(-jnp.inf)
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
    cum = jnp.cumsum(sorted_p, axis=-1)
    # the probability at which the cumulative sum first reaches top_p: keep all >= it
    idx = jnp.argmax(cum >= s.top_p, axis=-1)
    cutoff = jnp.take_along_axis(sorted_p, idx[:, None], axis=-1)
    probs = jnp.where(probs < cutoff, 0.0, probs)
    if s.top_k > 0:
        kth = sorted_p[:, min(s.top_k, probs.shape[-1]) - 1][:, None]
        probs = jnp.where(probs < kth, 0.0, probs)
    if s.temperature != 1.0:
        probs = probs ** (1.0 / s.temperature)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


@nnx.jit
def _prefill(model, tokens, state):
    logits, state = model(tokens, state)
    return logits[:, -1], state


@nnx.jit(static_argnames=("sampling",))
def _decode_step(model, logits, state, counts, key, sampling: Sampling):
    """Sample from ``logits`` [B, V], feed the token, return next logits and state."""
    s = sampling
    penalised = logits - (s.presence_penalty * (counts > 0) + s.frequency_penalty * counts)
    key, sub = jax.random.split(key)
    tok = sample_logits(penalised, sub, s)
    counts = counts * s.penalty_decay
    counts = counts.at[jnp.arange(tok.shape[0]), tok].add(1.0)
    logits, state = model(tok[:, None], state)
    return tok, logits[:, -1], state, counts, key


def prefill(model, prompts: Sequence[Sequence[int]], state=None):
    """Run each prompt through the model; returns (last logits [B, V], stacked state).

    ``state`` (optional) is the batched state to continue from.
    """
    rows_logits, rows_state = [], []
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError("a prompt must contain at least one token")
        row_state = (model.init_state(1) if state is None
                     else jax.tree.map(lambda s: s[i:i + 1], state))
        logits, row_state = _prefill(model, jnp.asarray([list(ids)], jnp.int32), row_state)
        rows_logits.append(logits)
        rows_state.append(row_state)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows_state)
    return jnp.concatenate(rows_logits, axis=0), stacked


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                    sampling: Sampling = Sampling(), seed: int = 0,
                    state=None) -> Iterator[tuple[np.ndarray, object]]:
    """Yield ``(tokens [B] int32, state)`` after each generated token, for every prompt."""
    logits, state = prefill(model, prompts, state)
    counts = jnp.zeros(logits.shape, F32)
    key = jax.random.PRNGKey(seed)
    for _ in range(max_tokens):
        tok, logits, state, counts, key = _decode_step(model, logits, state, counts, key,
                                                       sampling)
        yield np.asarray(tok), state


def generate(model, tokenizer, prompt: str, *, max_tokens: int = 100, seed: int = 0,
             stop: Sequence[str] = (), **sampling) -> str:
    """Generate text continuing ``prompt`` (the prompt is not included in the result)."""
    out = []
    for text in stream(model, tokenizer, [prompt], max_tokens=max_tokens, seed=seed,
                       stop=stop, **sampling):
        out.append(text[0])
    return "".join(out)


def stream(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100, seed: int = 0,
           stop: Sequence[str] = (), state=None, **sampling) -> Iterator[list[str]]:
    """Yield, per step, the newly completed text of each prompt (whole UTF-8 characters only).

    Generation of a row ends at a stop string (not included) or after ``max_tokens``.
    """
    from rwkv_jax.tokenizers import StreamDecoder
    s = Sampling(**sampling)
    ids = [tokenizer.encode(p) for p in prompts]
    decoders = [StreamDecoder(tokenizer) for _ in prompts]
    texts = ["" for _ in prompts]
    emitted = [0 for _ in prompts]
    done = [False for _ in prompts]
    hold = max((len(x) for x in stop), default=1) - 1  # chars that may start a stop string
    for toks, _ in generate_tokens(model, ids, max_tokens=max_tokens, sampling=s, seed=seed,
                                   state=state):
        chunk = []
        for i, t in enumerate(toks):
            if done[i]:
                chunk.append("")
                continue
            texts[i] += decoders[i].feed([int(t)])
            cut = min((texts[i].find(x) for x in stop if x in texts[i]), default=-1)
            if cut >= 0:
                texts[i], done[i] = texts[i][:cut], True
                safe = len(texts[i])
            else:
                safe = max(emitted[i], len(texts[i]) - hold)
            chunk.append(texts[i][emitted[i]:safe])
            emitted[i] = safe
        yield chunk
        if all(done):
            return
    yield [("" if done[i] else (texts[i] + decoders[i].flush())[emitted[i]:])
           for i in range(len(prompts))]
