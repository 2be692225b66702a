"""The reference side of every ``resets`` test: a packed row run as its documents one by one.

``resets[b, t] = True`` means token t of row b starts a new document: the first document of
a row continues the initial state (unless the row resets at t = 0), every later one starts
from the empty state. Running each document separately through a reference and
concatenating must give exactly what the packed call gives.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def spans(resets_row) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the documents of one row (a bool [T] array)."""
    T = len(resets_row)
    starts = [0] + [t for t in range(1, T) if resets_row[t]]
    return list(zip(starts, starts[1:] + [T]))


def by_documents(fn: Callable, seq, state, resets):
    """Run each row's documents one by one through ``fn(seq_doc, state_or_None)``.

    ``seq``: tuple of [B, T, ...] arrays (sliced per document to [1, t, ...]); ``state``: a
    pytree of [B, ...] arrays (row b: ``x[b:b+1]``); ``fn`` returns ``(y [1, t, ...],
    final_state)`` and takes None for the empty state. Returns ``(y [B, T, ...], final
    state pytree [B, ...])``. Written with jnp, so it is differentiable when ``fn`` is.
    """
    resets = np.asarray(resets)
    ys, finals = [], []
    for b in range(resets.shape[0]):
        st = None if resets[b, 0] else jax.tree_util.tree_map(lambda x, b=b: x[b:b + 1], state)
        row = []
        for s, e in spans(resets[b]):
            y, st = fn(tuple(x[b:b + 1, s:e] for x in seq), st if s == 0 else None)
            row.append(y)
        ys.append(jnp.concatenate(row, axis=1))
        finals.append(st)
    final = jax.tree_util.tree_map(lambda *x: jnp.concatenate(x, axis=0), *finals)
    return jnp.concatenate(ys, axis=0), final


def by_documents_batched(fn: Callable, seq, state, resets, empty_state):
    """:func:`by_documents` as one call: every document becomes a batch row of its own,
    zero-padded at the end to T, through ``fn(seq [n_docs, T, ...], state [n_docs, ...])``.

    Only for recurrences that zero inputs leave unchanged (RWKV-5/6/7: zero keys, values and
    log decays add nothing and keep the state), so each row's final state is its document's.
    One shape for all documents, so a jitted reference compiles once. ``empty_state`` is
    one row's empty state, [1, ...].
    """
    resets = np.asarray(resets)
    B, T = resets.shape
    docs = [(b, s, e) for b in range(B) for s, e in spans(resets[b])]
    rows = [[jnp.pad(x[b, s:e], ((0, T - (e - s)),) + ((0, 0),) * (x.ndim - 2)) for b, s, e in docs]
            for x in seq]
    states = [state[b:b + 1] if s == 0 and not resets[b, 0] else empty_state for b, s, _ in docs]
    y_docs, S_docs = fn(tuple(jnp.stack(r) for r in rows), jnp.concatenate(states, axis=0))
    ys = [jnp.concatenate([y_docs[i, :e - s] for i, (b_, s, e) in enumerate(docs) if b_ == b])
          for b in range(B)]
    last = [max(i for i, d in enumerate(docs) if d[0] == b) for b in range(B)]
    return jnp.stack(ys), S_docs[np.asarray(last)]


def random_resets(B: int, T: int, seed: int) -> np.ndarray:
    """bool [B, T] with the awkward cases: a reset at t = 0 (row 1), two in a row, one at a
    chunk boundary (t = 16), one on the last token, and two random ones in row 1."""
    rng = np.random.default_rng(seed)
    r = np.zeros((B, T), bool)
    if B > 1 and T > 2:
        r[1, rng.choice(np.arange(1, T), 2, replace=False)] = True
    if B > 1:
        r[1, 0] = True
    for t in (3, 4, 16, T - 1):
        if t < T:
            r[0, t] = True
    return r
