"""Parity with the official implementation on real trained checkpoints (RWKV-4/5.1/5.2/6/7),
through the public call a user makes: ``rwkv_jax.load(path)`` then ``model(tokens, state)``.

``../shared/fixtures/tiny-rwkv/reference-logits.npz`` holds logits from the official
``rwkv`` package (fp32); our fp32 logits must match within 1e-4 absolute whole-sequence,
as a prefix followed by the continued state, and token by token, in every WKV form the
version supports, all in one process. Repeating any of these calls compiles nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import CompileCounter
from flax import nnx

import rwkv_jax
import rwkv_jax.versions

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
# every concrete WKV form each version's recurrence has
# (stem, impl): every fixture in every form its version has; "auto" stands for the form the
# platform picks (it also runs the checks that do not depend on the form)
CASES = [(stem, impl) for stem in MODELS for impl in
         ("auto", *(f.value for f in rwkv_jax.versions.spec(VERSIONS[stem]).wkv_forms
                    if f is not rwkv_jax.RWKVConfig.tiny(VERSIONS[stem]).resolved_impl))]


@pytest.fixture(scope="module")
def refs(fixtures_dir):
    return dict(np.load(fixtures_dir / "reference-logits.npz"))


@functools.cache
def _model(path: str, overrides: tuple):
    return rwkv_jax.load(path, **dict(overrides))


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{i}" for s, i in CASES])
def case(request, fixtures_dir):
    stem, impl = request.param
    overrides = {**MODELS[stem]}
    if impl != "auto":
        overrides["wkv_impl"] = impl
    if impl == "chunked":
        overrides["chunk_size"] = 16
    return _model(str(fixtures_dir / f"{stem}.pth"), tuple(sorted(overrides.items()))), stem


@pytest.fixture(scope="module", params=list(MODELS))
def default_case(request, fixtures_dir):
    """Each fixture in the platform's default form (the form-independent checks)."""
    stem = request.param
    return _model(str(fixtures_dir / f"{stem}.pth"), tuple(sorted(MODELS[stem].items()))), stem


def _ref(refs, stem, prompt="shakespeare128"):
    return refs[f"{stem}/{prompt}/tokens"][None], refs[f"{stem}/{prompt}/logits"]


def test_version_inferred(case):
    model, stem = case
    assert model.config.version == VERSIONS[stem]


def test_whole_sequence(case, refs):
    model, stem = case
    tokens, want = _ref(refs, stem)
    logits, state = model(tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (1, tokens.shape[1], 256)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=ATOL, rtol=0)
    with CompileCounter() as c:
        again, _ = model(tokens)
    assert c.compiles == 0
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_three_token_prompt(default_case, refs):
    model, stem = default_case
    tokens, want = _ref(refs, stem, "quote_in")
    logits, _ = model(tokens)
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=ATOL, rtol=0)


def _prefix_then_state(model, tokens, want, cuts):
    for cut in cuts:
        first, state = model(tokens[:, :cut])
        rest, _ = model(tokens[:, cut:], state)
        got = np.concatenate([np.asarray(first[0]), np.asarray(rest[0])])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_prefix_then_state(case, refs):
    # a chunk boundary; 14: the prefix runs as one left-padded chunk of 16 with a reset
    _prefix_then_state(case[0], *_ref(refs, case[1]), cuts=(64, 14))


def test_prefix_then_state_any_cut(default_case, refs):
    # 77 = 64 + 3x4 + 1 then 51 = 3x16 + 3x1: cuts inside the eager chunk lengths
    _prefix_then_state(default_case[0], *_ref(refs, default_case[1]), cuts=(77,))


def test_token_by_token(case, refs):
    model, stem = case
    tokens, want = _ref(refs, stem)
    n = 40  # enough steps to carry the state through every layer many times
    state, rows = None, []
    logits, state = model(tokens[:, :1], state)
    rows.append(np.asarray(logits[0, 0]))
    with CompileCounter() as c:
        for t in range(1, n):
            logits, state = model(tokens[:, t:t + 1], state)
            rows.append(np.asarray(logits[0, 0]))
    assert c.compiles == 0, f"{c.compiles} compilations in {n - 1} repeated one-token calls"
    np.testing.assert_allclose(np.stack(rows), want[:n], atol=ATOL, rtol=0)


def test_logits_to_keep(default_case, refs):
    """The last n rows, the head computed for them alone; the state is the full call's."""
    model, stem = default_case
    tokens, want = _ref(refs, stem)
    _, full_state = model(tokens)
    for n in (1, 70, 200):  # inside the last chunk, across both, more than T
        logits, state = model(tokens, logits_to_keep=n)
        assert logits.shape == (1, min(n, 128), 256)
        np.testing.assert_allclose(np.asarray(logits[0]), want[-min(n, 128):], atol=ATOL, rtol=0)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("stem", list(MODELS))
def test_inside_user_jit_and_grad(fixtures_dir, refs, stem):
    """Inside ``nnx.jit`` and ``jax.jit`` the call is traced whole; both match the reference,
    repeated calls compile nothing, and ``jax.grad`` through it works."""
    model = _model(str(fixtures_dir / f"{stem}.pth"), tuple(sorted(MODELS[stem].items())))
    tokens, want = _ref(refs, stem)
    step = nnx.jit(lambda m, t, s: m(t, s, logits_to_keep=1))
    _, s0 = model(tokens[:, :8])
    a, _ = step(model, tokens[:, 8:16], s0)
    graphdef, params = nnx.split(model)
    pure = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    b, _ = pure(params, tokens)
    with CompileCounter() as c:
        step(model, tokens[:, 8:16], s0)
        pure(params, tokens)
    assert c.compiles == 0
    np.testing.assert_allclose(np.asarray(a[0, -1]), want[15], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(b[0]), want, atol=ATOL, rtol=0)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens[:, :16])
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grads = jax.grad(loss)(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_batch_rows_independent(fixtures_dir, refs):
    """Two different prompts in one batch give each prompt's own reference logits."""
    stem = "rwkv4-tiny-660k"
    model = _model(str(fixtures_dir / f"{stem}.pth"), ())
    tokens = refs[f"{stem}/shakespeare128/tokens"]
    logits, _ = model(np.stack([tokens[:64], tokens[64:]]))
    np.testing.assert_allclose(np.asarray(logits[0]), refs[f"{stem}/shakespeare128/logits"][:64],
                               atol=ATOL, rtol=0)
    solo, _ = model(tokens[None, 64:])
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(solo[0]), atol=1e-5, rtol=0)
