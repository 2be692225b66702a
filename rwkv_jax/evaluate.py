"""Evaluation: loss, perplexity and bits per byte over long text; LAMBADA-style accuracy.

* :func:`evaluate_tokens` scores a token sequence of any length in windows of ``ctx_len``
  tokens, carrying the recurrent state from each window to the next, so the result equals
  one forward pass over the whole sequence (token ``i+1`` is predicted from tokens ``0..i``;
  the first token is context only). Bits per byte = total nats / ln 2 / the UTF-8 bytes of
  the scored tokens; for a byte-level model it is loss / ln 2.
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
import json
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

__all__ = [
    "LambadaEval",
    "TextEval",
    "default_lambada_prefix",
    "evaluate_file",
    "evaluate_text",
    "evaluate_tokens",
    "lambada",
    "lambada_file",
    "read_jsonl_texts",
]


@dataclasses.dataclass(frozen=True)
class TextEval:
    """Result of :func:`evaluate_tokens`: sums and the derived metrics."""

    n_tokens: int        # tokens scored (predicted)
    n_bytes: int         # UTF-8 bytes of the scored tokens
    nll_sum: float       # total negative log-likelihood, nats
    n_correct: int       # tokens whose argmax prediction was right

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
                "n_tokens": self.n_tokens, "n_bytes": self.n_bytes}


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


# ---- jitted pieces -------------------------------------------------------------------------
def _token_scores(logits, targets):
    """log p(target) and argmax == target at each position: [B, T] f32, [B, T] bool."""
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return tgt, jnp.argmax(logits, axis=-1) == targets


@functools.partial(jax.jit, static_argnums=0)
def _window(moduledef, values, x, y, mask, state):
    """Summed NLL and hits of one window [B, T] (masked), and the state after it."""
    logits, state = moduledef.merge(values).forward(x, state)
    tgt, hit = _token_scores(logits, y)
    return -jnp.sum(tgt * mask), jnp.sum(hit.astype(F32) * mask), state


@functools.partial(jax.jit, static_argnums=0)
def _batch(moduledef, values, x, y):
    """Per-position log p(target) and hits of a batch [B, T] from the empty state."""
    logits, _ = moduledef.merge(values).forward(x)
    return _token_scores(logits, y)


# ---- text ------------------------------------------------------------------------------------
def evaluate_tokens(model, tokens, *, ctx_len: int = 1024, tokenizer=None, state=None,
                    progress: Callable[[int, int], None] | None = None) -> TextEval:
    """Score ``tokens`` (1-D ints, any length) in windows of ``ctx_len``, carrying the state.

    ``tokenizer`` (optional) counts the bytes of the scored tokens for bits per byte; without
    it each token counts as one byte. ``state`` (batch 1) continues a previous context.
    ``progress(done, total)`` is called after each window.
    """
    if ctx_len <= 0:
        raise ValueError(f"ctx_len must be positive, got {ctx_len}")
    tokens = np.asarray(tokens).reshape(-1)
    n = tokens.shape[0] - 1
    if n < 1:
        raise ValueError("need at least 2 tokens to evaluate")
    moduledef, values = functional.split(model)
    state = model.init_state(1) if state is None else state
    W = min(ctx_len, n)
    nll, correct, n_bytes = 0.0, 0.0, 0
    for start in range(0, n, W):
        x = np.asarray(tokens[start:min(start + W, n)], np.int32)
        y = np.asarray(tokens[start + 1:start + 1 + x.shape[0]], np.int32)
        m = x.shape[0]
        mask = np.zeros(W, np.float32)
        mask[:m] = 1.0
        if m < W:  # last window: pad (the padded state is never used again)
            x, y = np.pad(x, (0, W - m)), np.pad(y, (0, W - m))
        s, c, state = _window(moduledef, values, x[None], y[None], mask[None], state)
        nll += float(s)
        correct += float(c)
        n_bytes += (len(tokenizer.decode_bytes(y[:m].tolist())) if tokenizer is not None else m)
        if progress is not None:
            progress(start + m, n)
    return TextEval(n_tokens=n, n_bytes=n_bytes, nll_sum=nll, n_correct=round(correct))


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
        return evaluate_tokens(model, src.tokens, ctx_len=ctx_len,
                               tokenizer=src.tokenizer or tokenizer, **kw)
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
    """The ``"text"`` of every line of a ``.jsonl`` file (blank lines skipped)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" "
                                 f"string ({type(e).__name__}: {e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: \"text\" is not a string")  # noqa: TRY004
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
