"""Which sample each training row draws: pure functions of ``(seed, step, row)``.

Nothing here depends on history, so resuming at any step is exact and each host computes only
its own rows. Two orders:

* ``"random"``: a counter-based hash of ``(seed, step, row)`` (SplitMix64, vectorized).
* ``"magic_prime"``: RWKV-LM's permutation (reference §5.5): sample ``i`` takes choice
  ``(⌊p·(√5−1)/2⌋ · (i+1)³) mod p`` for the largest prime ``p ≡ 2 (mod 3)`` that fits, so
  each of the ``p`` choices comes once per ``p`` consecutive samples; ``seed`` is unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rwkv_jax.data.files import DataError

__all__ = ["SAMPLERS", "host_rows", "counter_hash", "is_prime", "largest_magic_prime",
           "magic_prime", "magic_permutation", "magic_prime_offsets", "choose"]

SAMPLERS = ("random", "magic_prime")
_MASK64 = (1 << 64) - 1


def host_rows(*, step: int, batch_size: int, ctx_len: int, seed: int, host_index: int,
              host_count: int) -> np.ndarray:
    """This host's global row indices ``h*B_local .. (h+1)*B_local - 1`` of a batch, after
    checking the arguments (``B_local = batch_size // host_count``)."""
    if batch_size <= 0 or ctx_len <= 0:
        raise DataError(f"batch_size and ctx_len must be positive, got {batch_size}, {ctx_len}")
    if host_count <= 0 or not 0 <= host_index < host_count:
        raise DataError(f"host_index {host_index} not in [0, host_count={host_count})")
    if batch_size % host_count:
        raise DataError(f"batch_size {batch_size} is not divisible by host_count {host_count}")
    if step < 0 or seed < 0:
        raise DataError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    b_local = batch_size // host_count
    return host_index * b_local + np.arange(b_local)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijective, well-mixed map of uint64 (wrapping math)."""
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_hash(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """A counter-based random uint64 per row, a pure function of ``(seed, step, row)``."""
    key = _splitmix64(np.asarray([seed & _MASK64], np.uint64))
    key = _splitmix64(key ^ np.asarray([step & _MASK64], np.uint64))
    return _splitmix64(key ^ np.asarray(rows, np.uint64))


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def largest_magic_prime(bound: float) -> int | None:
    """The largest prime ``p ≡ 2 (mod 3)`` with ``p < bound``, or None (none ``>= 2``)."""
    p = math.ceil(bound) - 1
    p -= (p - 2) % 3  # p ≡ 2 (mod 3)
    while p >= 2:
        if is_prime(p):
            return p
        p -= 3
    return None


def magic_prime(n_tokens: int, ctx_len: int) -> int:
    """RWKV-LM's magic prime: the largest prime ``p ≡ 2 (mod 3)`` below ``n_tokens/ctx_len - 1``.

    Cubing is then a bijection mod ``p``, so :func:`magic_prime_offsets` visits each of the ``p``
    windows once per ``p`` consecutive samples.
    """
    # strict upper bound; offsets end at (p-1)*ctx + ctx + 1 tokens
    p = largest_magic_prime(n_tokens / ctx_len - 1)
    if p is None:
        raise DataError(f"{n_tokens} tokens hold too few windows of {ctx_len} for the "
                        f"magic-prime sampler (need n_tokens/ctx_len - 1 > 2)")
    return p


def magic_permutation(sample_index: np.ndarray | Sequence[int], p: int) -> np.ndarray:
    """Choice in ``[0, p)`` of each global sample index (0-based): RWKV-LM's
    ``((⌊p·(√5−1)/2⌋ · ii³) mod p)`` with ``ii = 1 + sample_index``."""
    factor = int(p * (math.sqrt(5) - 1) / 2)
    return np.asarray([(factor * pow(1 + int(i), 3, p)) % p
                       for i in np.asarray(sample_index).ravel()], dtype=np.int64)


def magic_prime_offsets(sample_index: np.ndarray | Sequence[int], n_tokens: int,
                        ctx_len: int) -> np.ndarray:
    """Window starts for global sample indices (0-based), as RWKV-LM's ``dataset.py``:
    ``magic_permutation(i, magic_prime(n_tokens, ctx_len)) · ctx_len``."""
    return magic_permutation(sample_index, magic_prime(n_tokens, ctx_len)) * ctx_len


def choose(sampler: str, n_choices: int, *, seed: int, step: int, rows: np.ndarray,
           batch_size: int) -> np.ndarray:
    """Choice in ``[0, n_choices)`` for each global row of ``step`` (int64 ``[len(rows)]``).

    ``"random"``: ``counter_hash % n_choices`` (uniform up to a 2^-64-relative bias).
    ``"magic_prime"``: :func:`magic_permutation` of sample ``step * batch_size + row`` with the
    largest magic prime ``<= n_choices``.
    """
    if sampler == "random":
        return (counter_hash(seed, step, rows) % np.uint64(n_choices)).astype(np.int64)
    if sampler == "magic_prime":
        p = largest_magic_prime(n_choices + 1)
        if p is None:
            raise DataError(f"{n_choices} choices are too few for the magic-prime sampler "
                            "(need at least 2)")
        return magic_permutation(step * batch_size + rows, p)
    raise DataError(f"unknown sampler {sampler!r}; use 'random' or 'magic_prime'")
