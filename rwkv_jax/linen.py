"""Use an RWKV model inside Flax Linen code, through ``flax.nnx.bridge``.

:class:`RWKVLinen` is a Linen module wrapping the NNX :class:`~rwkv_jax.RWKV` with
``nnx.bridge.ToLinen``; its parameters live in Linen's ``params`` collection under the official
checkpoint keys (``params/rwkv/blocks/0/att/time_decay``, ...)::

    import flax.linen as nn
    from rwkv_jax.linen import RWKVLinen, linen_variables

    class Classifier(nn.Module):
        config: rwkv_jax.RWKVConfig

        @nn.compact
        def __call__(self, tokens):
            logits, state = RWKVLinen(self.config)(tokens)
            return nn.Dense(2)(logits[:, -1])

    variables = Classifier(cfg).init(jax.random.key(0), tokens)
    # a loaded checkpoint instead of the init:
    # variables["params"]["RWKVLinen_0"] = linen_variables(model)["params"]

Linen ``init`` runs the official initialisation; ``apply`` rebuilds the NNX module abstractly
(``nnx.eval_shape``, no init work) and fills it from the Linen variables.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model.lm import RWKV, abstract_model

__all__ = ["RWKVLinen", "linen_variables", "nnx_params"]


def _build(cfg: RWKVConfig, *, abstract: bool, rngs: nnx.Rngs) -> RWKV:
    if abstract:  # apply: every value is replaced from the Linen variables
        return abstract_model(cfg)
    return RWKV(cfg, rngs=rngs)


class RWKVLinen(nn.Module):
    """Linen RWKV language model: ``(tokens [B, T] int, state=None) -> (logits, state)``.

    Same call, state and numerics as :class:`rwkv_jax.RWKV` (it *is* that module, wrapped).
    ``init`` needs a ``params`` rng.
    """

    config: RWKVConfig

    @nn.compact
    def __call__(self, tokens, state=None):
        inner = nnx.bridge.ToLinen(
            _build, args=(self.config,), kwargs={"abstract": not self.is_initializing()},
            metadata_fn=None, name="rwkv")
        return inner(tokens, state)


def linen_variables(model: RWKV) -> dict[str, Any]:
    """An NNX model's parameters as :class:`RWKVLinen` variables (``{"params": {"rwkv": ...}}``),
    e.g. to run a loaded checkpoint through Linen code."""
    return {"params": {"rwkv": nnx.to_pure_dict(nnx.state(model, nnx.Param))}}


def nnx_params(variables: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`linen_variables`: from an :class:`RWKVLinen`'s variables
    (``{"params": {"rwkv": ...}}``; for one nested in a parent, pass
    ``{"params": parent_params["RWKVLinen_0"]}``) the parameter tree for
    ``nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), tree)``."""
    return dict(variables["params"]["rwkv"])
