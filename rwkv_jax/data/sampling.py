"""Train/validation split, step-keyed training batches and deterministic evaluation windows.

Sampling never depends on history: :func:`sample_batch` draws row ``r`` of step ``s`` from
:mod:`rwkv_jax.data.order`, a pure function of ``(seed, s, r)``, so resuming at any step is
exact and each host reads only its own rows. ``pack=True`` packs whole documents into rows
(:mod:`rwkv_jax.data.pack`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from rwkv_jax.data import order
from rwkv_jax.data.files import DataError
from rwkv_jax.data.formats import TokenSource
from rwkv_jax.data.pack import Batch, sample_packed_batch

if TYPE_CHECKING:
    from rwkv_jax.tokenizers import Tokenizer

__all__ = ["TrainValSplit", "SourceSplit", "split_tokens", "split_source", "sample_batch",
           "EvalBatch", "count_eval_batches", "eval_batches", "count_utf8_bytes"]


class TrainValSplit(NamedTuple):
    """Views of one token array: the first part trains, the tail validates."""

    train: np.ndarray
    val: np.ndarray


class SourceSplit(NamedTuple):
    """:class:`TrainValSplit` of a :class:`TokenSource` (mask and documents sliced along)."""

    train: TokenSource
    val: TokenSource


def _split_point(n: int, val_fraction: float, ctx_len: int | None) -> int:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(n * (1.0 - val_fraction))
    if ctx_len is None:
        return n_train
    if ctx_len <= 0:
        raise DataError(f"data.ctx_len must be positive, got {ctx_len}")
    if n_train < ctx_len + 1:
        raise DataError(f"data.ctx_len={ctx_len} needs at least {ctx_len + 1} training tokens, "
                        f"but the training split has {n_train} (of {n} tokens with "
                        f"data.val_fraction={val_fraction}); use more data or a smaller "
                        "data.ctx_len")
    n_val = n - n_train
    if val_fraction > 0 and n_val < 2:
        raise DataError(f"data.val_fraction={val_fraction} leaves {n_val} validation token(s) "
                        f"of {n}; evaluation needs at least 2. Raise data.val_fraction, or set "
                        "it to 0 to train without validation")
    return n_train


def split_tokens(tokens: np.ndarray, val_fraction: float, *,
                 ctx_len: int | None = None) -> TrainValSplit:
    """First ``int(n * (1 - f))`` tokens train, the rest validate (nanoGPT's 90/10 convention).

    Both are views (no copy). ``val_fraction = 0`` gives an empty validation array. With
    ``ctx_len``, a split that cannot train (fewer than ``ctx_len + 1`` training tokens) or
    cannot validate (``val_fraction > 0`` but under 2 validation tokens) raises a
    :class:`DataError` naming ``data.ctx_len`` / ``data.val_fraction`` and the counts.
    """
    n_train = _split_point(int(tokens.shape[0]), val_fraction, ctx_len)
    return TrainValSplit(tokens[:n_train], tokens[n_train:])


def split_source(source: TokenSource, val_fraction: float, *,
                 ctx_len: int | None = None) -> SourceSplit:
    """:func:`split_tokens` for a :class:`TokenSource`: the parts keep their mask and
    document offsets (a document cut by the split becomes two)."""
    n_train = _split_point(len(source), val_fraction, ctx_len)
    return SourceSplit(source.slice(0, n_train), source.slice(n_train, len(source)))


def sample_batch(tokens: np.ndarray | TokenSource, *, step: int, batch_size: int, ctx_len: int,
                 seed: int, host_index: int = 0, host_count: int = 1,
                 sampler: Literal["random", "magic_prime"] = "random", pack: bool = False,
                 ) -> tuple[np.ndarray, np.ndarray] | Batch:
    """This host's rows of the global batch for ``step``.

    ``batch_size`` is the global batch; host ``h`` of ``host_count`` gets global rows
    ``h*B_local .. (h+1)*B_local - 1`` with ``B_local = batch_size // host_count``, so the
    hosts' slices concatenated are the single-host batch. Each row depends only on
    ``(seed, step, row)``.

    Given a token **array** (``pack`` must be False): ``(x, y)``, each ``[B_local, T]`` int32.
    Row ``g`` is a window of ``ctx_len + 1`` tokens, ``x = window[:-1]``, ``y = window[1:]``,
    starting at

    * ``"random"``: uniform over all starts (up to a 2^-64-relative modulo bias), from a
      counter-based hash of ``(seed, step, g)``;
    * ``"magic_prime"``: RWKV-LM's permutation (:func:`magic_prime_offsets`) of sample
      ``step * batch_size + g``; ``seed`` is unused. Windows start at multiples of ``ctx_len``
      and each is visited once per ``p`` samples.

    Given a :class:`TokenSource`: a :class:`~rwkv_jax.data.pack.Batch` ``(x, y, resets, mask)``.
    ``pack=False``: the same windows (they run across document boundaries, as RWKV-LM's do;
    ``resets`` only at position 0), ``mask`` the source's loss mask of each target (1.0 when
    it has none). ``pack=True``: packed rows of whole documents
    (:func:`~rwkv_jax.data.pack.sample_packed_batch`; both samplers choose among rows).
    """
    if isinstance(tokens, TokenSource) and pack:
        return sample_packed_batch(tokens, step=step, batch_size=batch_size, ctx_len=ctx_len,
                                   seed=seed, host_index=host_index, host_count=host_count,
                                   sampler=sampler)
    if pack:
        raise DataError("pack=True needs a TokenSource (it knows the document boundaries), "
                        "not a bare token array")
    source = tokens if isinstance(tokens, TokenSource) else None
    arr = source.tokens if source is not None else tokens
    rows = order.host_rows(step=step, batch_size=batch_size, ctx_len=ctx_len, seed=seed,
                           host_index=host_index, host_count=host_count)
    n = int(arr.shape[0])
    if n < ctx_len + 1:
        raise DataError(f"{n} tokens are fewer than one window of ctx_len + 1 = {ctx_len + 1}")
    if sampler == "magic_prime":
        starts = order.magic_prime_offsets(step * batch_size + rows, n, ctx_len).tolist()
    else:
        starts = order.choose(sampler, n - ctx_len, seed=seed, step=step, rows=rows,
                              batch_size=batch_size).tolist()
    win = np.stack([np.asarray(arr[s:s + ctx_len + 1]) for s in starts]).astype(np.int32)
    x, y = win[:, :-1], win[:, 1:]
    if source is None:
        return x, y
    resets = np.zeros(x.shape, np.bool_)
    resets[:, 0] = True
    if source.mask is None:
        mask = np.ones(x.shape, np.float32)
    else:
        mask = np.stack([np.asarray(source.mask[s + 1:s + ctx_len + 1]) for s in starts]
                        ).astype(np.float32)
    return Batch(x, y, resets, mask)


class EvalBatch(NamedTuple):
    """``x``, ``y``: ``[B, T]`` int32; ``mask``: ``[B, T]`` bool, True where ``y`` is a target."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


def count_eval_batches(n_tokens: int, *, batch_size: int, ctx_len: int) -> int:
    """How many batches :func:`eval_batches` yields without ``max_batches``."""
    n_windows = -(-max(n_tokens - 1, 0) // ctx_len)
    return -(-n_windows // batch_size)


def eval_batches(tokens: np.ndarray | TokenSource, *, batch_size: int, ctx_len: int,
                 max_batches: int | None = None) -> Iterator[EvalBatch]:
    """Deterministic, non-overlapping windows over ``tokens`` for validation loss.

    Window ``j`` has ``x = tokens[j*T : j*T+T]`` and ``y = tokens[j*T+1 : j*T+T+1]``, so every
    token after the first is a target exactly once. Nothing is dropped: the last window and the
    last batch are padded with id 0 and ``mask`` marks the real targets (average the loss over
    ``mask``). Each window starts from a fresh state, as in nanoGPT-style evaluation. Given a
    :class:`TokenSource` with a loss mask, ``mask`` is also False where the target is masked
    out (chat prompts). Fewer than 2 tokens give no batches.
    """
    if batch_size <= 0 or ctx_len <= 0:
        raise DataError(f"batch_size and ctx_len must be positive, got {batch_size}, {ctx_len}")
    loss_mask = tokens.mask if isinstance(tokens, TokenSource) else None
    if isinstance(tokens, TokenSource):
        tokens = tokens.tokens
    n = int(tokens.shape[0])
    n_targets = max(n - 1, 0)
    total = count_eval_batches(n, batch_size=batch_size, ctx_len=ctx_len)
    if max_batches is not None:
        total = min(total, max_batches)
    for b in range(total):
        x = np.zeros((batch_size, ctx_len), np.int32)
        y = np.zeros((batch_size, ctx_len), np.int32)
        mask = np.zeros((batch_size, ctx_len), np.bool_)
        for r in range(batch_size):
            start = (b * batch_size + r) * ctx_len
            m = min(ctx_len, n_targets - start)
            if m <= 0:
                break
            chunk = np.asarray(tokens[start:start + m + 1])
            x[r, :m], y[r, :m], mask[r, :m] = chunk[:-1], chunk[1:], True
            if loss_mask is not None:
                mask[r, :m] &= np.asarray(loss_mask[start + 1:start + m + 1]) > 0
        yield EvalBatch(x, y, mask)


def count_utf8_bytes(tokens: np.ndarray, tokenizer: Tokenizer, *, chunk: int = 1 << 16) -> int:
    """UTF-8 bytes of the decoded text, for bits per byte = ``sum(nats) / ln 2 / bytes``.

    Decodes in chunks of ``chunk`` tokens; a character split across a chunk boundary may be
    counted as replacement characters, an error of a few bytes per chunk at most.
    """
    total = 0
    for i in range(0, int(tokens.shape[0]), chunk):
        total += len(tokenizer.decode(np.asarray(tokens[i:i + chunk]).tolist()).encode("utf-8"))
    return total
