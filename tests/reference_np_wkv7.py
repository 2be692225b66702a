"""fp64 numpy transcription of the RWKV-7 WKV recurrence, for parity tests.

A line-by-line re-statement of the official CUDA kernel loop quoted in
``../shared/docs/rwkv-reference.md`` §5.1 (thread = value row i), run in float64 numpy so
that it is a trustworthy oracle for the fp32/bf16 library forms. Nothing here imports
``rwkv_jax``. Shapes: B batch, T time, H heads, N head size; the state is [value i, key j].
"""

from __future__ import annotations

import numpy as np


def wkv7_ref(r, w, k, v, a, b, state=None, resets=None):
    """RWKV-7 WKV (reference §5.1), per token, in fp64.

    Args:
      r, w, k, v, a, b: [B, T, H, N]; ``w`` is the *log* decay (the kernel multiplies by
        ``exp(w)``). The model passes ``a = -kk``, ``b = kk ⊙ a_iclr``.
      state: [B, H, N, N] initial state in the official [value, key] layout; ``None`` = zeros.
      resets: optional bool [B, T]; ``resets[b, t]`` zeroes row b's state before token t
        (a new document starts there).

    Returns:
      ``(y [B, T, H, N], final_state [B, H, N, N])``, both float64.
    """
    r, w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b))
    B, T, H, N = r.shape
    S = np.zeros((B, H, N, N)) if state is None else np.array(state, np.float64)
    y = np.empty((B, T, H, N))
    for t in range(T):
        if resets is not None:
            S = np.where(np.asarray(resets, bool)[:, t, None, None, None], 0.0, S)
        # sa[i] = Σ_j S[i,j]·a[j], with the OLD state
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        # S[i,j] = S[i,j]·exp(w[j]) + sa[i]·b[j] + v[i]·k[j]
        S = (S * np.exp(w[:, t])[:, :, None, :]
             + sa[..., :, None] * b[:, t][:, :, None, :]
             + v[:, t][..., :, None] * k[:, t][:, :, None, :])
        # y[i] = Σ_j S[i,j]·r[j], read AFTER the update
        y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S
