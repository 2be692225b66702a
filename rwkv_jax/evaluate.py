"""Evaluation, defined once: cross-entropy, loss, perplexity, bits per byte; LAMBADA.

* :func:`token_nll` is the one per-token cross-entropy; the training loss
  (:func:`cross_entropy`), the trainer's validation and ``rwkv-jax eval`` all use it.
* :func:`score_windows` sums it over windows ``(x, y, mask)`` under one of two state
  policies, named in every result (:attr:`TextEval.state`):

  - ``"carry"``: one sequence scored in consecutive windows of ``ctx_len``, the state
    carried from each to the next, so the result equals one forward pass over the whole
    text (token ``i+1`` predicted from tokens ``0..i``; the first token is context only).
    This is what ``rwkv-jax eval`` reports by default.
  - ``"reset"``: each window from the empty state, several windows per batch, as training
    sees its data and as the trainer's validation reports (``val_loss``, ``val_bpb``).

  Bits per byte = total nats / ln 2 / the UTF-8 bytes of the scored target tokens
  (:func:`count_bytes`); for a byte-level model it is loss / ln 2.
* :func:`lambada` follows the official demos (reference §5.1): context
  ``prefix + encode(text without its last word)``, target ``encode(" " + last word)``;
  accuracy = every target token is the argmax; perplexity = ``exp(-mean over documents of
  sum log p(target tokens))``. The prefix is ``[0]`` (end of text) for the World and 20B
  vocabularies, as the demos do; byte and char models get no prefix (byte 0 is NUL, not a
  separator), which the ``prefix`` argument overrides.

The window and LAMBADA functions are jitted pure functions of the model's arrays
(:func:`rwkv_jax.model.functional.split`), cached per model structure; the last text window
is padded to ``ctx_len`` (masked out of the sums) and LAMBADA batches are right-padded to
power-of-two lengths, so few shapes are ever compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.model import functional

F32 = jnp.float32
LN2 = math.log(2.0)

STATE_POLICIES = ("carry", "reset")

__all__ = [
    "LambadaEval",
    "STATE_POLICIES",
    "TextEval",
    "count_bytes",
    "cross_entropy",
    "default_lambada_prefix",
    "evaluate_file",
    "evaluate_text",
    "evaluate_tokens",
    "lambada",
    "lambada_file",
    "read_jsonl_texts",
    "score_windows",
    "token_nll",
]


@dataclasses.dataclass(frozen=True)
class TextEval:
    """Result of :func:`score_windows`: sums, the state policy, and the derived metrics."""

    n_tokens: int        # tokens scored (predicted)
    n_bytes: int         # UTF-8 bytes of the scored tokens
    nll_sum: float       # total negative log-likelihood, nats
    n_correct: int       # tokens whose argmax prediction was right
    state: str = "carry"  # "carry" or "reset": see the module docstring

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood, nats per token."""
        return self.nll_sum / max(self.n_tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / LN2 / max(self.n_bytes, 1)

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_tokens, 1)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "accuracy": self.accuracy,
                "n_tokens": self.n_tokens, "n_bytes": self.n_bytes, "state": self.state}


@dataclasses.dataclass(frozen=True)
class LambadaEval:
    """Result of :func:`lambada`."""

    n_docs: int
    n_correct: int
    logp_sum: float      # sum over documents of log p(target tokens), nats
    prefix: tuple[int, ...]

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_docs, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logp_sum / max(self.n_docs, 1))

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "perplexity": self.perplexity,
                "n_docs": self.n_docs, "prefix": list(self.prefix)}


# ---- the one definition -------------------------------------------------------------------
def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy in nats and argmax hits: logits [..., V] (any float dtype,
    computed in float32), targets [...] int -> (nll [...] float32, hit [...] bool)."""
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Mean :func:`token_nll` over the positions where ``mask`` (default: all), float32."""
    nll, _ = token_nll(logits, targets)
    if mask is None:
        return jnp.mean(nll)
    m = mask.astype(F32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def count_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes of target tokens ``ids`` (their decoded bytes; one byte per token without
    a tokenizer)."""
    ids = np.asarray(ids).reshape(-1)
    if tokenizer is None:
        return int(ids.size)
    return len(tokenizer.decode_bytes(ids.tolist()))


@functools.partial(jax.jit, static_argnums=0)
def _window(moduledef, values, x, y, mask, state):
    """Summed NLL and hits of one window batch [B, T] over ``mask``, and the state after."""
    logits, state = moduledef.merge(values).forward(x, state)
    nll, hit = token_nll(logits, y)
    m = mask.astype(F32)
    return jnp.sum(nll * m), jnp.sum(hit.astype(F32) * m), state


@functools.partial(jax.jit, static_argnums=0)
def _batch(moduledef, values, x, y):
    """Per-position log p(target) and hits of a batch [B, T] from the empty state."""
    logits, _ = moduledef.merge(values).forward(x)
    nll, hit = token_nll(logits, y)
    return -nll, hit


def score_windows(model, windows: Iterable, *, state_policy: str, tokenizer=None, state=None,
                  total: int | None = None, put: Callable | None = None,
                  progress: Callable[[int, int], None] | None = None) -> TextEval:
    """Sum :func:`token_nll` over ``windows`` of ``(x [B, T], y [B, T], mask [B, T])`` (numpy).

    ``state_policy``: "carry" (each window continues from the state the previous one ended
    in, starting from ``state`` or the empty state; B must be 1) or "reset" (each window
    batch from ``state``, a state for B rows, by default the empty state: a tuned initial
    state is scored this way). ``put(array)`` places each host array on the devices (the
    trainer's sharding across processes; default: as given). ``progress(done, total)`` after
    each window batch, ``total`` its count when known.
    """
    if state_policy not in STATE_POLICIES:
        raise ValueError(f"state policy must be one of {', '.join(STATE_POLICIES)}, got "
                         f"{state_policy!r}")
    put = put or (lambda a: a)
    moduledef, values = functional.split(model)
    nll, correct, n_tokens, n_bytes, done = 0.0, 0.0, 0, 0, 0
    start = state
    for x, y, mask in windows:
        x, y, mask = (np.asarray(a) for a in (x, y, mask))
        if state_policy == "reset":
            state = start  # None: built inside the jitted window (right for a sharded batch)
        s, c, new_state = _window(moduledef, values, put(x.astype(np.int32)),
                                  put(y.astype(np.int32)), put(mask.astype(np.float32)), state)
        if state_policy == "carry":
            state = new_state
        nll += float(s)
        correct += float(c)
        targets = y[mask > 0]
        n_tokens += int(targets.size)
        n_bytes += count_bytes(tokenizer, targets)
        done += 1
        if progress is not None:
            progress(done, total if total is not None else done)
    return TextEval(n_tokens=n_tokens, n_bytes=n_bytes, nll_sum=nll,
                    n_correct=round(correct), state=state_policy)


# ---- text ------------------------------------------------------------------------------------
def carried_windows(tokens, ctx_len: int):
    """Consecutive windows ``(x, y, mask)`` [1, W] over one token sequence, W =
    min(ctx_len, n - 1); the last is padded (masked). Scored with the state carried they
    equal one pass over the whole sequence."""
    tokens = np.asarray(tokens).reshape(-1)
    n = tokens.shape[0] - 1
    W = min(ctx_len, n)
    for start in range(0, n, W):
        x = np.asarray(tokens[start:min(start + W, n)], np.int32)
        y = np.asarray(tokens[start + 1:start + 1 + x.shape[0]], np.int32)
        m = x.shape[0]
        mask = np.zeros(W, bool)
        mask[:m] = True
        if m < W:  # last window: pad (the padded state is never used again)
            x, y = np.pad(x, (0, W - m)), np.pad(y, (0, W - m))
        yield x[None], y[None], mask[None]


def evaluate_tokens(model, tokens, *, ctx_len: int = 1024, tokenizer=None, state=None,
                    state_policy: str = "carry", batch_size: int = 1,
                    max_batches: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> TextEval:
    """Score ``tokens`` (1-D ints, any length, or a :class:`~rwkv_jax.data.TokenSource`,
    whose loss mask then applies) in windows of ``ctx_len``.

    ``state_policy="carry"`` (default): consecutive windows, the state carried across them
    (``state``, batch 1, continues a previous context). ``"reset"``: the trainer's
    validation windows (:func:`rwkv_jax.data.eval_batches`: ``batch_size`` windows per batch,
    each from the empty state, at most ``max_batches`` batches). ``tokenizer`` counts the
    bytes of the scored tokens for bits per byte (without it each token is one byte).
    """
    from rwkv_jax import data
    if ctx_len <= 0:
        raise ValueError(f"ctx_len must be positive, got {ctx_len}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    src = tokens if isinstance(tokens, data.TokenSource) else None
    if src is None:
        tokens = np.asarray(tokens).reshape(-1)
    n = (len(src) if src is not None else tokens.shape[0]) - 1
    if n < 1:
        raise ValueError("need at least 2 tokens to evaluate")
    if state_policy == "reset":
        total = data.count_eval_batches(n + 1, batch_size=batch_size, ctx_len=ctx_len)
        total = total if max_batches is None else min(total, max_batches)
        windows = data.eval_batches(tokens, batch_size=batch_size, ctx_len=ctx_len,
                                    max_batches=max_batches)
        return score_windows(model, windows, state_policy="reset", tokenizer=tokenizer,
                             total=total, progress=progress)
    if src is not None and src.mask is not None:
        raise ValueError("a token source with a loss mask is scored with state_policy='reset'")
    seq = src.tokens if src is not None else tokens
    W = min(ctx_len, n)
    return score_windows(model, carried_windows(seq, ctx_len), state_policy="carry",
                         tokenizer=tokenizer, state=state, total=-(-n // W), progress=progress)


def evaluate_text(model, tokenizer, text: str, *, ctx_len: int = 1024, **kw) -> TextEval:
    """:func:`evaluate_tokens` over ``tokenizer.encode(text)``."""
    return evaluate_tokens(model, tokenizer.encode(text), ctx_len=ctx_len, tokenizer=tokenizer,
                           **kw)


_IN_MEMORY_BYTES = 64 << 20


def evaluate_file(model, tokenizer, path: str | os.PathLike, *, ctx_len: int = 1024,
                  cache_dir=None, **kw) -> TextEval:
    """Evaluate a text file, or a prepared / binidx token file (``rwkv_jax.data``).

    Text up to 64 MiB is tokenized in memory; larger files go through
    :func:`rwkv_jax.data.open_text` (streamed, cached, no document separator).
    """
    from rwkv_jax import data
    p = pathlib.Path(path)
    if p.suffix in (".bin", ".idx") or (p.suffix == ".json" and not p.is_dir()):
        src = data.open_tokens(p, tokenizer, cache_dir=cache_dir)
        seq = src if kw.get("state_policy") == "reset" else src.tokens  # reset: with its mask
        return evaluate_tokens(model, seq, ctx_len=ctx_len, tokenizer=src.tokenizer or tokenizer,
                               **kw)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.stat().st_size <= _IN_MEMORY_BYTES:
        return evaluate_text(model, tokenizer, p.read_text(encoding="utf-8"), ctx_len=ctx_len,
                             **kw)
    src = data.open_text(p, tokenizer, cache_dir=cache_dir, doc_separator=None)
    return evaluate_tokens(model, src.tokens, ctx_len=ctx_len, tokenizer=tokenizer, **kw)


# ---- LAMBADA -------------------------------------------------------------------------------
def default_lambada_prefix(tokenizer) -> tuple[int, ...]:
    """``(0,)`` (end of text) for the World and GPT-NeoX 20B vocabularies, else ``()``."""
    name = str(getattr(tokenizer, "name", "")).lower()
    return (0,) if any(k in name for k in ("world", "20b", "neox")) else ()


def read_jsonl_texts(path: str | os.PathLike) -> list[str]:
    """The ``"text"`` of every line of a ``.jsonl`` file (blank lines skipped); DataError
    naming ``path:line`` for a line that is not an object with a ``"text"`` string."""
    from rwkv_jax.data import DataError
    from rwkv_jax.data.jsonl import read_jsonl
    texts = []
    for lineno, obj in read_jsonl(path):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a \"text\" string")
        texts.append(text)
    return texts


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def lambada(model, tokenizer, texts: Iterable[str], *, prefix: Sequence[int] | None = None,
            batch_size: int = 16,
            progress: Callable[[int, int], None] | None = None) -> LambadaEval:
    """Last-word accuracy and perplexity, the official demos' convention (module docstring).

    ``prefix``: ids before each context; ``None`` = :func:`default_lambada_prefix`. Documents
    are batched by length, right-padded (causal, so padding after the target changes nothing).
    """
    prefix = tuple(default_lambada_prefix(tokenizer) if prefix is None else prefix)
    docs = []
    for i, text in enumerate(texts):
        if " " not in text.strip():
            raise ValueError(f"document {i}: needs at least two words: {text[:60]!r}")
        ctx, last = text.rsplit(" ", 1)
        src = list(prefix) + tokenizer.encode(ctx)
        dst = tokenizer.encode(" " + last)
        if not src or not dst:
            raise ValueError(f"document {i}: empty context or target: {text[:60]!r}")
        docs.append((src, dst))
    moduledef, values = functional.split(model)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i][0]) + len(docs[i][1]))
    logp_sum, n_correct, done = 0.0, 0, 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        seqs = [docs[i][0] + docs[i][1] for i in idx]
        T = _bucket(max(len(s) for s in seqs) - 1)
        B = batch_size if len(order) > batch_size else len(idx)  # fixed batch shape
        x = np.zeros((B, T), np.int32)
        y = np.zeros((B, T), np.int32)
        for r, s in enumerate(seqs):
            x[r, :len(s) - 1], y[r, :len(s) - 1] = s[:-1], s[1:]
        tgt, hit = _batch(moduledef, values, x, y)
        tgt, hit = np.asarray(tgt), np.asarray(hit)
        for r, i in enumerate(idx):
            src, dst = docs[i]
            pos = slice(len(src) - 1, len(src) - 1 + len(dst))  # positions predicting dst
            logp_sum += float(tgt[r, pos].astype(np.float64).sum())
            n_correct += int(hit[r, pos].all())
        done += len(idx)
        if progress is not None:
            progress(done, len(docs))
    return LambadaEval(n_docs=len(docs), n_correct=n_correct, logp_sum=logp_sum, prefix=prefix)


def lambada_file(model, tokenizer, path: str | os.PathLike, **kw) -> LambadaEval:
    """:func:`lambada` over the texts of a ``.jsonl`` file."""
    return lambada(model, tokenizer, read_jsonl_texts(path), **kw)
