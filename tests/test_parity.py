"""Parity with the official implementation on real trained checkpoints (RWKV-4/5.1/5.2/6/7).

``../shared/fixtures/tiny-rwkv/reference-logits.npz`` holds logits from the official
``rwkv`` package (fp32); our fp32 logits must match within 1e-4 absolute whole-sequence,
as a prefix followed by the continued state, and token by token.
"""

from __future__ import annotations

import functools

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
    "rwkv5.1-tiny-730k": {"ln_x_eps": 1e-5},  # trained with GroupNorm eps 1e-5 (README)
    "rwkv5.2-tiny-730k": {"ln_x_eps": 1e-5},
    "rwkv6-tiny-3m": {},
    "rwkv7-tiny-834k": {},
}
VERSIONS = {"rwkv4-tiny-660k": "4", "rwkv5.1-tiny-730k": "5.1", "rwkv5.2-tiny-730k": "5.2",
            "rwkv6-tiny-3m": "6", "rwkv7-tiny-834k": "7"}


@pytest.fixture(scope="module")
def refs(fixtures_dir):
    return dict(np.load(fixtures_dir / "reference-logits.npz"))


class Runner:
    """A loaded model behind one jitted pure function (compiled once per input shape)."""

    def __init__(self, model):
        self.model = model
        graphdef, params = nnx.split(model)
        self.params = params
        self.fn = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s))

    def __call__(self, tokens, state=None):
        tokens = jnp.asarray(tokens, jnp.int32)
        state = self.model.init_state(tokens.shape[0]) if state is None else state
        return self.fn(self.params, tokens, state)


@functools.cache
def _runner(path: str, overrides: tuple) -> Runner:
    return Runner(rwkv_jax.load(path, **dict(overrides)))


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, fixtures_dir):
    stem = request.param
    return _runner(str(fixtures_dir / f"{stem}.pth"), tuple(MODELS[stem].items())), stem


def test_version_inferred(case):
    runner, stem = case
    assert runner.model.config.version == VERSIONS[stem]


@pytest.mark.parametrize("prompt", ["quote_in", "shakespeare128"])
def test_whole_sequence(case, refs, prompt):
    runner, stem = case
    logits, state = runner(refs[f"{stem}/{prompt}/tokens"][None])
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    np.testing.assert_allclose(np.asarray(logits[0]), refs[f"{stem}/{prompt}/logits"],
                               atol=ATOL, rtol=0)


def test_prefix_then_state(case, refs):
    runner, stem = case
    tokens = refs[f"{stem}/shakespeare128/tokens"][None]
    first, state = runner(tokens[:, :64])
    rest, _ = runner(tokens[:, 64:], state)
    got = np.concatenate([np.asarray(first[0]), np.asarray(rest[0])])
    np.testing.assert_allclose(got, refs[f"{stem}/shakespeare128/logits"], atol=ATOL, rtol=0)


def test_token_by_token(case, refs):
    runner, stem = case
    tokens = refs[f"{stem}/shakespeare128/tokens"][None]
    n = 40  # enough steps to carry the state through every layer many times
    state, rows = None, []
    for t in range(n):
        logits, state = runner(tokens[:, t:t + 1], state)
        rows.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(rows), refs[f"{stem}/shakespeare128/logits"][:n],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("stem, impl", [("rwkv4-tiny-660k", "associative"),
                                        ("rwkv5.2-tiny-730k", "chunked"),
                                        ("rwkv6-tiny-3m", "chunked"),
                                        ("rwkv7-tiny-834k", "chunked")])
def test_parallel_forms_match_official(fixtures_dir, refs, stem, impl):
    """The training forms (associative / chunked WKV) give the official logits too."""
    runner = Runner(rwkv_jax.load(fixtures_dir / f"{stem}.pth", wkv_impl=impl,
                                  chunk_size=None if impl == "associative" else 16,
                                  **MODELS[stem]))
    logits, _ = runner(refs[f"{stem}/shakespeare128/tokens"][None])
    np.testing.assert_allclose(np.asarray(logits[0]), refs[f"{stem}/shakespeare128/logits"],
                               atol=ATOL, rtol=0)


def test_batch_rows_independent(fixtures_dir, refs):
    """Two different prompts in one batch give each prompt's own reference logits."""
    stem = "rwkv4-tiny-660k"
    runner = _runner(str(fixtures_dir / f"{stem}.pth"), ())
    tokens = refs[f"{stem}/shakespeare128/tokens"]
    logits, _ = runner(np.stack([tokens[:64], tokens[64:]]))
    np.testing.assert_allclose(np.asarray(logits[0]), refs[f"{stem}/shakespeare128/logits"][:64],
                               atol=ATOL, rtol=0)
    solo, _ = runner(tokens[None, 64:])
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(solo[0]), atol=1e-5, rtol=0)
