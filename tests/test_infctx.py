"""Long rows in chunks ("infctx", ``train.chunk_len``): the chunked loss is the whole-row
loss, its "full" gradient the whole-row gradient, its "truncated" gradient the one with the
carried state cut between chunks; memory follows the chunk; config and CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax.config import ConfigError
from rwkv_jax.evaluate import token_nll
from rwkv_jax.model.lm import RWKV
from rwkv_jax.train import methods, optim
from rwkv_jax.train.config import load_config
from rwkv_jax.train.step import Batch, StepSpec, loss_fn

B, T = 2, 16


def _perturb(tree, seed, scale):
    """Random offsets on every float leaf: the official init zeroes some projections
    (e.g. RWKV-7's ``att.output``), which would leave the state's gradient path unused."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in zip(keys, leaves)])


def _setup(version, method="full"):
    """(spec for chunk_len=0, params, frozen, micro-batch with zeros in its mask)."""
    cfg = rwkv_jax.RWKVConfig.tiny(version, n_layer=2)
    model = RWKV(cfg, rngs=nnx.Rngs(0))
    if method == "state":
        meth = methods.State(cfg)
        _, weights, _ = nnx.split(model, nnx.Param, ...)
        nnx.update(model, _perturb(weights, 1, 0.05))
        graphdef, params, frozen = meth.split(model)
        params = _perturb(params, 2, 0.3)  # a nonzero initial state
    else:
        meth = methods.Full()
        graphdef, params, frozen = meth.split(model)
        params = _perturb(params, 1, 0.05)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    assert 0 < float(mask.sum()) < B * T
    spec = StepSpec(graphdef=graphdef, method=meth, tx=optax.identity(), lr=lambda s: 0.0)
    return spec, params, frozen, Batch(x, y, mask)


def _value_and_grad(spec, params, frozen, micro):
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, frozen, micro, jax.random.key(0),
                                                     spec=spec)))
    return f(params)


def _assert_close(got, want, rtol):
    """Every leaf within ``rtol`` of the largest magnitude of its reference leaf."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(np.abs(w).max(), 1e-30)
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale)


def _rel_diff(a, b) -> float:
    """Largest leaf-wise ``max|a - b| / max|b|``."""
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(y).max(), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _with(spec, **changes):
    return StepSpec(**{**spec.__dict__, **changes})


def test_full_chunks_equal_whole_rows_rwkv7():
    """chunk_len T, T/2, T/4 ("full"): the loss and every gradient of whole rows."""
    spec, params, frozen, micro = _setup("7")
    loss0, grad0 = _value_and_grad(spec, params, frozen, micro)
    assert float(loss0) > 0
    for L in (T, T // 2, T // 4):
        loss, grad = _value_and_grad(_with(spec, chunk_len=L), params, frozen, micro)
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
        _assert_close(grad, grad0, 1e-5)


def test_packed_rows_in_chunks_equal_whole_rows():
    """Packed documents (``resets``, one on a chunk boundary, one inside a chunk) in chunks
    of T/4: the loss and gradient of the whole packed rows."""
    spec, params, frozen, micro = _setup("7")
    resets = np.zeros((B, T), np.bool_)
    resets[:, 0] = True
    resets[0, T // 4] = resets[1, 3] = resets[1, T // 2 + 1] = True
    micro = micro._replace(resets=jnp.asarray(resets))
    loss0, grad0 = _value_and_grad(spec, params, frozen, micro)
    no_resets, _ = _value_and_grad(spec, params, frozen, micro._replace(resets=None))
    assert abs(float(no_resets) - float(loss0)) > 1e-4  # the resets matter here
    loss, grad = _value_and_grad(_with(spec, chunk_len=T // 4), params, frozen, micro)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    _assert_close(grad, grad0, 1e-5)


def _truncated_reference(spec, params, frozen, micro, L):
    """The truncated loss by hand: chunk by chunk in Python, the state cut between chunks,
    each chunk's masked NLL sum over the whole batch's mask count, L2Wrap over B·T."""
    model = spec.method.build(spec.graphdef, params, frozen)
    state = spec.method.initial_state(params, B) or model.init_state(B)
    count = jnp.maximum(micro.mask.sum(), 1.0)
    total = 0.0
    for c in range(T // L):
        sl = slice(c * L, (c + 1) * L)
        logits, state = model(micro.x[:, sl], state)
        nll, _ = token_nll(logits, micro.y[:, sl])
        total = total + optim.l2wrap(jnp.sum(nll * micro.mask[:, sl]) / count, logits, B * T)
        state = jax.lax.stop_gradient(state)
    return total


@pytest.mark.parametrize("version, method", [
    ("7", "state"),
    pytest.param("4", "full", marks=pytest.mark.slow),
    pytest.param("6", "full", marks=pytest.mark.slow),
    pytest.param("4", "state", marks=pytest.mark.slow),
    pytest.param("7", "full", marks=pytest.mark.slow)])
def test_full_and_truncated_chunks(version, method):
    """chunk_len T/4: "full" gives whole rows' loss and gradient (with "state": from a
    nonzero, trained initial state); "truncated" the same loss, a different gradient, and
    exactly that of the hand-written cut."""
    spec, params, frozen, micro = _setup(version, method)
    L = T // 4
    loss0, grad0 = _value_and_grad(spec, params, frozen, micro)
    loss_f, grad_f = _value_and_grad(_with(spec, chunk_len=L), params, frozen, micro)
    np.testing.assert_allclose(float(loss_f), float(loss0), rtol=1e-6)
    _assert_close(grad_f, grad0, 1e-5)
    trunc = _with(spec, chunk_len=L, chunk_grad="truncated")
    loss_t, grad_t = _value_and_grad(trunc, params, frozen, micro)
    np.testing.assert_allclose(float(loss_t), float(loss0), rtol=1e-6)
    assert _rel_diff(grad_t, grad_f) > 1e-3  # the cut changes the gradient ...
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(
        lambda p: _truncated_reference(spec, p, frozen, micro, L)))(params)
    np.testing.assert_allclose(float(loss_t), float(ref_loss), rtol=1e-6)
    _assert_close(grad_t, ref_grad, 1e-5)  # ... to exactly the hand-cut one


def test_chunks_bound_the_step_memory():
    """The compiled gradient's temporaries follow the chunk, not the row (CPU
    ``memory_analysis``; deterministic, not a timing)."""
    cfg = rwkv_jax.RWKVConfig.tiny("7", n_layer=2)
    meth = methods.Full()
    graphdef, params, frozen = meth.split(RWKV(cfg, rngs=nnx.Rngs(0)))
    rows = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    micro = Batch(rows, rows, jax.ShapeDtypeStruct((1, 512), jnp.float32))

    def temp_bytes(chunk_len):
        spec = StepSpec(graphdef=graphdef, method=meth, tx=optax.identity(),
                        lr=lambda s: 0.0, chunk_len=chunk_len)
        f = jax.jit(jax.grad(lambda p, m: loss_fn(p, frozen, m, jax.random.key(0),
                                                  spec=spec)))
        return f.lower(params, micro).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(32)
    assert chunked < whole / 4, (whole, chunked)


def test_chunk_len_must_divide_ctx_len(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.chunk_len.*data\.ctx_len.*\(100\).*\(32\)"):
        load_config(None, [f"out_dir={tmp_path}", "data.ctx_len=100", "train.chunk_len=32"])
    with pytest.raises(ConfigError, match="train.chunk_grad"):
        load_config(None, [f"out_dir={tmp_path}", "train.chunk_grad=partial"])
    with pytest.raises(ConfigError, match="train.chunk_len"):
        load_config(None, [f"out_dir={tmp_path}", "train.chunk_len=-1"])
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.ctx_len=128", "train.chunk_len=32",
                             "train.chunk_grad=truncated"])
    assert (cfg.train.chunk_len, cfg.train.chunk_grad) == (32, "truncated")


def test_cli_trains_in_chunks(tmp_path, capsys):
    from rwkv_jax.cli.main import main
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog ran far away " * 200)
    args = ["train", f"out_dir={tmp_path / 'run'}", f"data.path={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "model.version=7", "model.n_layer=2",
            "model.n_embd=32", "model.head_size=16", "data.ctx_len=32", "train.batch_size=2",
            "train.max_steps=2", "train.log_every=1", "train.eval_every=0",
            "checkpoint.every=2", "logging.progress=false", "train.sample_tokens=0"]
    assert main([*args, "train.chunk_len=8"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    capsys.readouterr()
    assert main([*args[:1], f"out_dir={tmp_path / 'bad'}", *args[2:],
                 "train.chunk_len=12"]) == 2
    err = capsys.readouterr().err
    assert "train.chunk_len" in err and "data.ctx_len" in err
