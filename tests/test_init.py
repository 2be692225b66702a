"""The official initialisers (``rwkv_jax.model.layers``): torch ``orthogonal_(gain)`` and
``uniform_`` semantics, every computation path, determinism, and no random work when a model
is built abstractly (``nnx.eval_shape``, as the checkpoint loader does).

``orthogonal(rng, (out, in), gain)`` draws an [max, min] float32 standard normal matrix from
``rng`` (a numpy Generator, one ``standard_normal`` call for up to 2**20 elements) and returns
gain times its QR factor with diag(R) > 0, transposed when out < in. The reference below
redraws that matrix from an identically seeded generator and factorises it in float64, so a
wrong factor, sign convention, gain or orientation fails, not just a non-orthogonal one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax.model import layers


def _gen(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(seed))


def _reference(seed: int, shape, gain: float) -> np.ndarray:
    """torch ``orthogonal_``'s result for the normal matrix ``orthogonal`` draws (float64)."""
    rows, cols = shape
    a = _gen(seed).standard_normal((max(shape), min(shape)), dtype=np.float32)
    q, r = np.linalg.qr(a.astype(np.float64))
    q = q * np.sign(np.diagonal(r))[None, :]
    return gain * (q.T if rows < cols else q)


# (shape, path): small matrices take the host QR; larger ones (here: every matrix, with the
# size limit lowered) Cholesky QR on the device when tall enough, else Householder QR there
SHAPES = [((32, 8), "host"), ((8, 32), "host"), ((24, 24), "host"),
          ((512, 32), "cholesky"), ((32, 512), "cholesky"), ((2000, 400), "cholesky"),
          ((96, 96), "householder"), ((120, 100), "householder"), ((100, 120), "householder")]


@pytest.mark.parametrize("shape,path", SHAPES)
def test_orthogonal_is_torch_orthogonal(shape, path, monkeypatch):
    rows, cols = shape
    m, n = max(shape), min(shape)
    if path != "host":
        monkeypatch.setattr(layers, "_HOST_QR_SIZE", 0)
        assert layers._cholesky_is_exact(m, n) == (path == "cholesky")
    gain = 1.7
    w = np.asarray(layers.orthogonal(_gen(3), shape, gain, jnp.float32), np.float64)
    assert w.shape == shape
    # rows orthonormal when out < in, columns when out >= in (scaled by gain)
    gram = w @ w.T if rows < cols else w.T @ w
    np.testing.assert_allclose(gram, gain**2 * np.eye(n), atol=2e-5 * gain**2)
    np.testing.assert_allclose(w, _reference(3, shape, gain), atol=2e-5 * gain)


def test_orthogonal_large_draw_blocks_are_deterministic():
    """Above 2**20 elements the normals are drawn block by block on several threads."""
    shape = (2048, 640)
    a = layers.orthogonal(_gen(5), shape, 0.5, jnp.float32)
    b = layers.orthogonal(_gen(5), shape, 0.5, jnp.float32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = np.asarray(a, np.float64)
    np.testing.assert_allclose(w.T @ w, 0.25 * np.eye(640), atol=1e-5)
    c = np.asarray(layers.orthogonal(_gen(6), shape, 0.5, jnp.float32))
    assert np.abs(c - np.asarray(a)).max() > 0.01


def test_orthogonal_dtype_and_gain_zero():
    rng = _gen(0)
    before = rng.bit_generator.state["state"]["state"].copy()
    z = layers.orthogonal(rng, (300, 1000), 0.0, jnp.bfloat16)
    assert z.dtype == jnp.bfloat16 and z.shape == (300, 1000)
    assert not np.any(np.asarray(z, np.float32))
    np.testing.assert_array_equal(rng.bit_generator.state["state"]["state"], before)  # no draw
    w = layers.orthogonal(_gen(0), (200, 30), 1.0, jnp.bfloat16)
    assert w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(w, np.float32), _reference(0, (200, 30), 1.0),
                               atol=4e-3)


def test_gain_zero_keeps_the_key_stream():
    """A gain-0 matrix takes its key like any other: what follows does not shift."""
    r1, r2 = nnx.Rngs(0), nnx.Rngs(0)
    layers.orthogonal(layers.host_rng(r1), (64, 64), 1.0, jnp.float32)
    after_drawn = layers.orthogonal(layers.host_rng(r1), (64, 64), 1.0, jnp.float32)
    layers.orthogonal(layers.host_rng(r2), (64, 64), 0.0, jnp.float32)
    after_zero = layers.orthogonal(layers.host_rng(r2), (64, 64), 1.0, jnp.float32)
    np.testing.assert_array_equal(np.asarray(after_drawn), np.asarray(after_zero))


@pytest.mark.parametrize("shape", [(1000, 600), (1500, 1000)])  # one block; several blocks
def test_uniform_bounds_and_moments(shape):
    scale = 1e-4
    x = np.asarray(layers.uniform(_gen(1), shape, scale, jnp.float32), np.float64)
    assert x.shape == shape and x.dtype == np.float64
    assert x.min() >= -scale and x.max() < scale
    n = x.size
    # U(-s, s): mean 0 (sd s/sqrt(3n)), variance s²/3, and both halves equally full
    assert abs(x.mean()) < 5 * scale / np.sqrt(3 * n)
    assert abs(x.var() / (scale**2 / 3) - 1) < 0.01
    assert abs((x > 0).mean() - 0.5) < 0.005
    y = np.asarray(layers.uniform(_gen(1), shape, scale, jnp.float32))
    np.testing.assert_array_equal(np.asarray(x, np.float32), y)
    b = layers.uniform(_gen(1), shape, scale, jnp.bfloat16)
    assert b.dtype == jnp.bfloat16


def _state(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("version", ["4", "7"])
def test_same_seed_same_weights(version):
    cfg = rwkv_jax.RWKVConfig.tiny(version, n_layer=2)
    a = _state(rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))
    b = _state(rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))
    c = _state(rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(1)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    head = a["head/weight"].astype(np.float64)
    V, C = head.shape
    gain = 0.5 * np.sqrt(V / C) if V > C else 0.5
    np.testing.assert_allclose(head.T @ head if V >= C else head @ head.T,
                               gain**2 * np.eye(min(V, C)), atol=1e-5 * gain**2)


def test_eval_shape_build_does_no_random_work(monkeypatch):
    """The loader's abstract build: no generator is made and no factorisation is traced."""
    def refuse(*a, **k):
        raise AssertionError("random work while building abstractly")

    monkeypatch.setattr(np.random, "Generator", refuse)
    cfg = rwkv_jax.RWKVConfig.preset("rwkv7-0.1b")
    abstract = nnx.eval_shape(lambda: rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert sum(x.size for x in leaves) > 150_000_000
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    jaxpr = str(jax.make_jaxpr(
        lambda: nnx.state(rwkv_jax.RWKV(rwkv_jax.RWKVConfig.tiny("7", n_layer=2),
                                        rngs=nnx.Rngs(0))))())
    for prim in ("random_bits", "qr", "householder", "cholesky", "triangular_solve",
                 "dot_general"):
        assert prim not in jaxpr, prim


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_abstract_model_takes_no_key_and_matches_eval_shape(version, monkeypatch):
    """``abstract_model`` (what the loader builds) has the structure, names, shapes and
    dtypes of the plain ``nnx.eval_shape`` build, and never asks an ``Rngs`` for a key (each
    traced key cost the loader milliseconds)."""
    from rwkv_jax.model.lm import abstract_model
    cfg = rwkv_jax.RWKVConfig.tiny(version, n_layer=2)
    plain = nnx.eval_shape(lambda: rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))

    def refuse(self, *a, **k):
        raise AssertionError("a key was drawn during the abstract build")

    monkeypatch.setattr(nnx.RngStream, "__call__", refuse)
    fast = abstract_model(cfg)
    flat = lambda m: {k: (v.shape, v.dtype) for k, v in  # noqa: E731
                      nnx.to_flat_state(nnx.state(m))}
    assert flat(fast) == flat(plain)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(fast)))
    monkeypatch.undo()
    # outside the block a build draws keys as before
    assert not layers._SHAPES_ONLY.get()
    a = _state(rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))
    assert np.any(a["head/weight"] != 0)
