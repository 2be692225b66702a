"""Linen interop: an RWKV inside a Linen module gives the NNX model's logits and state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rwkv_jax
from rwkv_jax.linen import RWKVLinen, linen_variables, nnx_params

CFG = rwkv_jax.RWKVConfig.tiny()


class TaggedLM(nn.Module):
    """A Linen model around the RWKV: logits plus a small classification head."""

    config: rwkv_jax.RWKVConfig

    @nn.compact
    def __call__(self, tokens, state=None):
        logits, state = RWKVLinen(self.config)(tokens, state)
        return logits, nn.Dense(3)(logits[:, -1]), state


def test_linen_model_matches_nnx():
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], jnp.int32)
    lm = TaggedLM(CFG)
    variables = lm.init(jax.random.key(0), tokens)
    rwkv_params = variables["params"]["RWKVLinen_0"]["rwkv"]
    assert rwkv_params["blocks"][0]["att"]["time_decay"].shape == (CFG.n_embd,)
    # the same weights as an NNX model: its parameters put into the Linen tree
    model = rwkv_jax.RWKV(CFG, rngs=nnx.Rngs(0))
    params = dict(variables["params"])
    params["RWKVLinen_0"] = linen_variables(model)["params"]
    variables = {**variables, "params": params}

    apply = jax.jit(lm.apply)
    logits, head, state = apply(variables, tokens)
    ref_logits, ref_state = model(tokens)
    assert logits.dtype == jnp.float32 and head.shape == (2, 3)
    # jitted Linen vs eager NNX: the same ops, fused differently
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lm.apply(variables, tokens)[0], ref_logits)  # both eager
    # continuing from the returned state, as with the NNX model
    more = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
    np.testing.assert_allclose(apply(variables, more, state)[0], model(more, ref_state)[0],
                               rtol=1e-5, atol=1e-5)
    # and back: Linen parameters into an NNX model
    other = rwkv_jax.RWKV(CFG, rngs=nnx.Rngs(1))
    nnx.replace_by_pure_dict(other_state := nnx.state(other, nnx.Param),
                             nnx_params({"params": variables["params"]["RWKVLinen_0"]}))
    nnx.update(other, other_state)
    np.testing.assert_array_equal(other(tokens)[0], ref_logits)


def test_linen_gradients_flow():
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    lm = TaggedLM(CFG)
    variables = lm.init(jax.random.key(1), tokens)

    def loss(params):
        logits, head, _ = lm.apply({"params": params}, tokens)
        return jnp.mean(head ** 2) + jnp.mean(logits ** 2)

    grads = jax.grad(loss)(variables["params"])
    # (att.output starts at zero, so the gradients reach it first)
    g = grads["RWKVLinen_0"]["rwkv"]["blocks"][1]["att"]["output"]["weight"]
    assert g.shape == (CFG.n_embd, CFG.n_embd) and float(jnp.abs(g).sum()) > 0
