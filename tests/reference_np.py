"""fp64 numpy transcriptions of the official recurrences, for parity tests.

Each function is a line-by-line re-statement of the formula in
``../shared/docs/rwkv-reference.md`` (section given per function), run in float64 numpy so
that it is a trustworthy oracle for the fp32/bf16 library forms. Nothing here imports
``rwkv_jax``. Shapes follow the library legend: B batch, T time, C channels.

Also the packed-document helpers that the reset tests of every version share:
:func:`reset_patterns` (the document-start masks to test) and :func:`run_documents` (the
independent oracle: each document run on its own).
"""

from __future__ import annotations

import numpy as np

# Empty-state running max of the official CUDA kernel (MIN_VALUE).
PP_EMPTY = -1e38


def wkv4_ref(w, u, k, v, aa=None, bb=None, pp=None, resets=None):
    """RWKV-4 WKV, the official stable (aa, bb, pp) recurrence (reference §2.1), in fp64.

    Args:
      w: [C] log decay per step (official ``W = -exp(time_decay)``, negative).
      u: [C] bonus in log space (``time_first``).
      k, v: [B, T, C].
      aa, bb, pp: [B, C] initial state (``a = aa·e^pp``, ``b = bb·e^pp``); ``None`` gives the
        empty state ``aa = bb = 0, pp = -1e38``.
      resets: optional bool [B, T]; ``resets[b, t]`` empties row b's state before token t
        (a new document starts there).

    Returns:
      ``(y [B, T, C], aa [B, C], bb [B, C], pp [B, C])``, all float64.
    """
    w = np.asarray(w, np.float64)
    u = np.asarray(u, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    B, T, C = k.shape
    aa = np.zeros((B, C)) if aa is None else np.array(aa, np.float64)
    bb = np.zeros((B, C)) if bb is None else np.array(bb, np.float64)
    pp = np.full((B, C), PP_EMPTY) if pp is None else np.array(pp, np.float64)
    y = np.empty((B, T, C))
    for t in range(T):
        if resets is not None:
            r = np.asarray(resets, bool)[:, t, None]
            aa, bb, pp = np.where(r, 0.0, aa), np.where(r, 0.0, bb), np.where(r, PP_EMPTY, pp)
        kk, vv = k[:, t], v[:, t]
        # output: the state before token t plus the bonus-weighted current token
        ww = u + kk
        q = np.maximum(pp, ww)
        e1 = np.exp(pp - q)
        e2 = np.exp(ww - q)
        y[:, t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        # state update: decay the old state by e^w, add e^k_t (v_t, 1)
        ww = pp + w
        q = np.maximum(ww, kk)
        e1 = np.exp(ww - q)
        e2 = np.exp(kk - q)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = q
    return y, aa, bb, pp


def reset_patterns(batch: int, T: int, chunks: tuple[int, ...] = (16,)) -> dict:
    """Named bool [batch, T] document-start masks; rows alternate between two layouts.

    none: no resets (must equal ``resets=None``); start: a reset at t = 0 (row 0, plus one
    mid-sequence) next to a row without any; consecutive: single-token documents (row 0 at
    t = 1, 2, 3; row 1 at the last two tokens, so the final state is a one-token document);
    short: many short documents (row 0 every 3 tokens from t = 0, row 1 random);
    boundary<c>, per chunk length c: resets exactly at chunk boundaries (and the token
    before them) in row 0, right after them in row 1.
    """
    t = np.arange(T)
    rng = np.random.default_rng([T, 99])
    two = {
        "none": (t < 0, t < 0),
        "start": ((t == 0) | (t == T // 2), t < 0),
        "consecutive": ((t >= 1) & (t <= 3), t >= T - 2),
        "short": (t % 3 == 0, rng.random(T) < 0.4),
    }
    for c in chunks:
        two[f"boundary{c}"] = (((t % c == 0) | (t % c == c - 1)) & (t > 0), t % c == 1)
    return {name: np.stack([rows[b % 2] for b in range(batch)]) for name, rows in two.items()}


def run_documents(resets, run):
    """The packed rows of ``resets`` [B, T] run one document at a time.

    ``run(b, start, end, carried)`` runs tokens ``start:end`` of row b alone (``carried``:
    the first document of a row without a reset at t = 0, which continues from the initial
    state; every other one starts empty) and returns ``(y [1, end - start, ...], state)``.
    Returns per row ``(y [1, T, ...] = the documents' outputs concatenated, final state =
    the last document's)``.
    """
    out = []
    for b, row in enumerate(np.asarray(resets, bool)):
        starts = sorted({0} | set(np.flatnonzero(row).tolist()))
        ys, state = [], None
        for i, (s, e) in enumerate(zip(starts, starts[1:] + [len(row)])):
            y, state = run(b, s, e, i == 0 and not row[0])
            ys.append(y)
        out.append((np.concatenate(ys, axis=1), state))
    return out
