"""What a run trains: the whole model, adapters, or the initial state (a :class:`Method`).

A method says how a model splits into what trains and what stays fixed, and how the
training step rebuilds the model (and its initial recurrent state) from those two parts.
The step (:mod:`rwkv_jax.train.step`) and the trainer only talk to this interface; the
optimizer sees only the trainable part, so only it carries optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.functional import dotted_name
from rwkv_jax.model.layers import LoRAParam
from rwkv_jax.model.lm import LayerState, init_state
from rwkv_jax.ops.wkv4 import Wkv4State


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


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The LoRA adapters train (:class:`~rwkv_jax.model.layers.LoRAParam`, attached with
    :func:`rwkv_jax.lora.attach`), and the parameters whose official names fully match one
    of ``train_also`` (RWKV-PEFT's ``train_parts``: e.g. LayerNorms, time-mix vectors) train
    in full; every other parameter is frozen and carries no optimizer state."""

    train_also: tuple[str, ...] = ()
    name: str = "lora"

    def trains(self, path, variable) -> bool:
        """The NNX filter of the trainable part (``path``: an NNX state path)."""
        if isinstance(variable, LoRAParam):
            return True
        return isinstance(variable, nnx.Param) and any(
            re.fullmatch(p, dotted_name(path)) for p in self.train_also)

    def split(self, model):
        return nnx.split(model, self.trains, ...)

    def build(self, graphdef, trainable, frozen):
        return nnx.merge(graphdef, trainable, frozen)

    def initial_state(self, trainable, batch_size: int):
        return None


@dataclasses.dataclass(frozen=True)
class State:
    """State tuning: only the initial recurrent state of every layer trains, one per layer
    shared by every row of the batch; all weights are frozen (and stay bit-identical).

    The trainable tree, by official-style names (RWKV-PEFT's ``time_state``)::

        blocks.<i>.att.time_state   the WKV state: [H, N, N] (v5/v6: [key, value]; v7:
                                    [value, key]); RWKV-4: {aa, bb, pp} each [C]
        blocks.<i>.att.time_shift   [C] time-mix token shift   (only with ``shift``)
        blocks.<i>.ffn.time_shift   [C] channel-mix token shift (only with ``shift``)

    Everything starts as the empty state, except RWKV-4's ``pp`` (the log scale of
    numerator ``aa·e^pp`` and denominator ``bb·e^pp``): the empty state has ``pp = -1e38``,
    where ``aa`` and ``bb`` get zero gradient, so it starts at 0 with ``aa = bb = 0`` (the
    same empty state: no weight on the past). The caveat: the tuned triple must keep a
    positive denominator, so ``bb`` is clamped at 0 when the state is built; ``aa`` and
    ``pp`` are free. ``cfg``: the model's config (the state's shapes).
    """

    cfg: RWKVConfig
    shift: bool = False
    name: str = "state"

    def split(self, model):
        graphdef, frozen = nnx.split(model)
        return graphdef, self.template(), frozen

    def template(self) -> dict:
        """The trainable tree at its start (the empty state; see the class docstring)."""
        blocks = {}
        for i, layer in enumerate(init_state(self.cfg, 1)):
            wkv = jax.tree.map(lambda a: a[0], layer.wkv)
            if isinstance(wkv, Wkv4State):  # start at pp = 0: see the class docstring
                wkv = {"aa": wkv.aa, "bb": wkv.bb, "pp": jnp.zeros_like(wkv.pp)}
            att = {"time_state": wkv}
            ffn = {}
            if self.shift:
                att["time_shift"] = layer.att_x_prev[0]
                ffn["time_shift"] = layer.ffn_x_prev[0]
            blocks[str(i)] = {"att": att, "ffn": ffn} if ffn else {"att": att}
        return {"blocks": blocks}

    def build(self, graphdef, trainable, frozen):
        return nnx.merge(graphdef, frozen)

    def initial_state(self, trainable, batch_size: int):
        """The model's state (``RWKV.init_state`` structure) for ``batch_size`` rows, each
        row the tuned state."""
        def rows(a):
            return jnp.broadcast_to(a[None].astype(jnp.float32), (batch_size, *a.shape))

        empty = init_state(self.cfg, batch_size)
        out = []
        for i, layer in enumerate(empty):
            t = trainable["blocks"][str(i)]
            wkv = t["att"]["time_state"]
            if isinstance(layer.wkv, Wkv4State):
                wkv = Wkv4State(rows(wkv["aa"]), rows(jnp.maximum(wkv["bb"], 0.0)),
                                rows(wkv["pp"]))
            else:
                wkv = rows(wkv)
            att_prev = rows(t["att"]["time_shift"]) if self.shift else layer.att_x_prev
            ffn_prev = rows(t["ffn"]["time_shift"]) if self.shift else layer.ffn_x_prev
            out.append(LayerState(att_prev, wkv, ffn_prev))
        return tuple(out)
