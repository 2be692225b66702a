"""What a training run carries from step to step: :class:`TrainState`, a pytree.

The trainable parameters and their optimizer state, the parameters held fixed (a fine-tune's
frozen base; empty when everything trains), the step counter (which the learning-rate
schedule reads inside the jitted step) and an RNG key (dropout). Everything a checkpoint
saves and a resume restores is here; the compiled step is a pure function of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
    """step: int32 [] optimizer steps taken; params: the trainable parameters (an
    ``nnx.State`` of official names); frozen: the parameters that do not train (same
    kind, possibly empty); opt_state: the optimizer's state for ``params`` only; rng: a
    uint32 [2] PRNG key, split by the step for randomness (dropout)."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, frozen, tx, seed: int) -> "TrainState":
        """The state before step 0: ``tx.init(params)`` and a key from ``seed``."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                   opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))
