"""Parity with the official implementation on real trained checkpoints.

``../shared/fixtures/tiny-rwkv/reference-logits.npz`` holds logits from the official
``rwkv`` package (fp32); our fp32 logits must match within 1e-4 absolute whole-sequence,
as a prefix followed by the continued state, and token by token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax

ATOL = 1e-4
# fixture stem -> load overrides the tensors cannot tell (fixtures README)
MODELS = {
    "rwkv4-tiny-660k": {},
}
PROMPTS = ("quote_in", "shakespeare128")


@pytest.fixture(scope="module")
def refs(fixtures_dir):
    return dict(np.load(fixtures_dir / "reference-logits.npz"))


@nnx.jit
def _forward(model, tokens, state):
    return model(tokens, state)


def _run(model, tokens, state=None):
    state = model.init_state(tokens.shape[0]) if state is None else state
    return _forward(model, tokens, state)


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_stem(request, fixtures_dir):
    stem = request.param
    return rwkv_jax.load(fixtures_dir / f"{stem}.pth", **MODELS[stem]), stem


@pytest.mark.parametrize("prompt", PROMPTS)
def test_whole_sequence(model_and_stem, refs, prompt):
    model, stem = model_and_stem
    tokens = refs[f"{stem}/{prompt}/tokens"]
    want = refs[f"{stem}/{prompt}/logits"]
    logits, state = _run(model, jnp.asarray(tokens)[None])
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("split", [1, 2, 50, 127])
def test_prefix_then_state(model_and_stem, refs, split):
    model, stem = model_and_stem
    tokens = jnp.asarray(refs[f"{stem}/shakespeare128/tokens"])[None]
    want = refs[f"{stem}/shakespeare128/logits"]
    first, state = _run(model, tokens[:, :split])
    rest, _ = _run(model, tokens[:, split:], state)
    got = np.concatenate([np.asarray(first[0]), np.asarray(rest[0])])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_token_by_token(model_and_stem, refs):
    model, stem = model_and_stem
    tokens = jnp.asarray(refs[f"{stem}/shakespeare128/tokens"])[None]
    want = refs[f"{stem}/shakespeare128/logits"]
    state, rows = model.init_state(1), []
    for t in range(tokens.shape[1]):
        logits, state = _forward(model, tokens[:, t:t + 1], state)
        rows.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(rows), want, atol=ATOL, rtol=0)


def test_batch_rows_independent(model_and_stem, refs):
    """Two different prompts in one batch give each prompt's own reference logits."""
    model, stem = model_and_stem
    a = refs[f"{stem}/shakespeare128/tokens"][:64]
    b = refs[f"{stem}/shakespeare128/tokens"][64:128]
    logits, _ = _run(model, jnp.asarray(np.stack([a, b])))
    np.testing.assert_allclose(np.asarray(logits[0]), refs[f"{stem}/shakespeare128/logits"][:64],
                               atol=ATOL, rtol=0)
    solo, _ = _run(model, jnp.asarray(b)[None])
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(solo[0]), atol=1e-5, rtol=0)
