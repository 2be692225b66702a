"""fp64 numpy transcription of the RWKV-5/6 WKV recurrence (reference §3.1, §4.1).

Per head, with state S [key i, value j]::

    y_t[j] = Σ_i r_t[i]·( u[i]·k_t[i]·v_t[j] + S[i, j] )
    S[i, j] <- exp(w_t[i])·S[i, j] + k_t[i]·v_t[j]

Written as the plain per-token loop of the official CPU/pip code, independent of
``rwkv_jax``. ``w`` is the log decay.
"""

from __future__ import annotations

import numpy as np


def wkv6_reference(r, w, k, v, u, state=None, resets=None):
    """r, k, v: [B, T, H, N]; w: log decay broadcastable to [B, T, H, N]; u: [H, N];
    state: [B, H, N, N] or None; resets: optional bool [B, T], ``resets[b, t]`` zeroes row
    b's state before token t (a new document starts there).
    Returns ``(y [B, T, H, N], S [B, H, N, N])`` in float64."""
    r, k, v = (np.asarray(x, np.float64) for x in (r, k, v))
    B, T, H, N = k.shape
    w = np.broadcast_to(np.asarray(w, np.float64), (B, T, H, N))
    u = np.asarray(u, np.float64)
    S = np.zeros((B, H, N, N)) if state is None else np.array(state, np.float64)
    y = np.zeros((B, T, H, N))
    for t in range(T):
        if resets is not None:
            S = np.where(np.asarray(resets, bool)[:, t, None, None, None], 0.0, S)
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                  # [B, H, i, j]
        y[:, t] = np.einsum("bhi,bhij->bhj", r[:, t], u[None, :, :, None] * kv + S)
        S = np.exp(w[:, t])[..., None] * S + kv
    return y, S
