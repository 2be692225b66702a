"""What a run trains: the whole model, adapters, or the initial state (a :class:`Method`).

A method says how a model splits into what trains and what stays fixed, and how the
training step rebuilds the model (and its initial recurrent state) from those two parts.
The step (:mod:`rwkv_jax.train.step`) and the trainer only talk to this interface; the
optimizer sees only the trainable part, so only it carries optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from flax import nnx


class Method(Protocol):
    """How a run trains a model (hashable: part of the compiled step's static spec)."""

    name: str

    def split(self, model) -> tuple[Any, Any, Any]:
        """``(graphdef, trainable, frozen)`` of ``model`` (the trainer's starting point)."""

    def build(self, graphdef, trainable, frozen):
        """The model a step runs, from the two parts (inside the traced step)."""

    def initial_state(self, trainable, batch_size: int):
        """The recurrent state each training row starts from; None = the empty state."""


@dataclasses.dataclass(frozen=True)
class Full:
    """Every parameter trains (pretraining, full fine-tuning)."""

    name: str = "full"

    def split(self, model):
        return nnx.split(model, nnx.Param, ...)

    def build(self, graphdef, trainable, frozen):
        return nnx.merge(graphdef, trainable, frozen)

    def initial_state(self, trainable, batch_size: int):
        return None
