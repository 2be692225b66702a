"""fp64 numpy transcriptions of the official recurrences, for parity tests.

Each function is a line-by-line re-statement of the formula in
``../shared/docs/rwkv-reference.md`` (section given per function), run in float64 numpy so
that it is a trustworthy oracle for the fp32/bf16 library forms. Nothing here imports
``rwkv_jax``. Shapes follow the library legend: B batch, T time, C channels.
"""

from __future__ import annotations

import numpy as np

# Empty-state running max of the official CUDA kernel (MIN_VALUE).
PP_EMPTY = -1e38


def wkv4_ref(w, u, k, v, aa=None, bb=None, pp=None):
    """RWKV-4 WKV, the official stable (aa, bb, pp) recurrence (reference §2.1), in fp64.

    Args:
      w: [C] log decay per step (official ``W = -exp(time_decay)``, negative).
      u: [C] bonus in log space (``time_first``).
      k, v: [B, T, C].
      aa, bb, pp: [B, C] initial state (``a = aa·e^pp``, ``b = bb·e^pp``); ``None`` gives the
        empty state ``aa = bb = 0, pp = -1e38``.

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
