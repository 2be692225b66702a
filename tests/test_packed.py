"""Packed documents through the public model call and the trainer.

``model(tokens, state, resets=r)`` with ``r[b, t] = True`` at each document's first token
must equal running every document alone from the empty state (the first document of a row
without a reset at t = 0 continues ``state``): logits, the returned state (the row's last
document's), and gradients of a loss over the packed row (the sum of the documents' own).
The reference runs the documents one by one through the same public call
(:mod:`documents`), and on the real fixtures the official implementation's logits.
``data.pack=true`` makes the trainer train on such rows.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import CompileCounter
from documents import spans
from flax import nnx

import rwkv_jax
import rwkv_jax.versions
from rwkv_jax.cli.main import main
from rwkv_jax.config import ConfigError
from rwkv_jax.train import step as step_mod
from rwkv_jax.train.config import load_config
from rwkv_jax.train.trainer import Trainer

ATOL = 1e-5
VERSIONS = ("4", "5.1", "5.2", "6", "7")
# every WKV form of every version. The fast suite runs the platform-default form of RWKV-4
# (vector state) and RWKV-7 (delta rule); every other case compiles one fwd+bwd program each
# of ~30-60 s on a loaded 2-core CPU (Pallas in interpret mode more), so it is marked slow
FAST = {("4", "scan"), ("7", "scan")}
CASES = [pytest.param(v, f.value, marks=[] if (v, f.value) in FAST else [pytest.mark.slow],
                      id=f"v{v}-{f.value}")
         for v in VERSIONS for f in rwkv_jax.versions.spec(v).wkv_forms]
B, T = 2, 20


def _tiny(version: str, impl: str) -> rwkv_jax.RWKV:
    """A tiny model with every parameter perturbed, so that no path is zero at init (the
    official init zeroes output projections and LoRA inputs, which would hide the token
    shift of whole branches)."""
    cfg = rwkv_jax.RWKVConfig.tiny(version, n_layer=2, wkv_impl=impl,
                                   **({"chunk_size": 16} if impl in ("chunked", "pallas")
                                      else {}))
    model = rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    leaves = [p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype) for p in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _batch(vocab: int, seed: int = 0):
    """Tokens [B, T] and resets: row 0 continues the given state and holds a one-token
    document (t = 3) and a document start on the chunk boundary t = 16 (chunk_size 16); row 1
    resets at t = 0, its first document is one token. Each row's last document is t = 16..19,
    so the documents' final states come from one [B, 4] call."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)
    resets = np.zeros((B, T), bool)
    resets[0, [3, 4, 16]] = True
    resets[1, [0, 1, 7, 16]] = True
    return tokens, resets


def _alone_as_rows(model, tokens, state, resets):
    """The logits of each row's documents, each run alone, as one call: every document is a
    row of its own from its start state (``state``'s row for a row's first document without
    a reset, else the empty state), zero-padded at the end to T (padding after a document
    cannot change its logits). Traced inline inside a jit/grad: one program for every
    document, differentiable in the parameters and in ``state``."""
    resets = np.asarray(resets)
    Bn, Tn = resets.shape
    docs = [(b, s, e) for b in range(Bn) for s, e in spans(resets[b])]
    rows = jnp.stack([jnp.pad(tokens[b, s:e], (0, Tn - (e - s))) for b, s, e in docs])
    empty = model.init_state(1)
    starts = [jax.tree.map(lambda x, b=b: x[b:b + 1], state) if s == 0 and not resets[b, 0]
              else empty for b, s, _ in docs]
    logits, _ = model(rows, jax.tree.map(lambda *x: jnp.concatenate(x), *starts))
    return jnp.stack([jnp.concatenate([logits[i, :e - s] for i, (b_, s, e) in enumerate(docs)
                                       if b_ == b]) for b in range(Bn)])


def _assert_state_close(got, want, atol=ATOL):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def _assert_grads_close(got, want):
    """Gradients equal up to fp32 summation order, relative to each tensor's size: on these
    perturbed tiny models merely changing the batch layout of the same rows moves some
    gradients by 5e-5 of their norm; a wrong reset moves them by far more than 5e-4."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = jax.tree_util.keystr(path)
        assert np.linalg.norm(a - b) <= 5e-4 * np.linalg.norm(b) + 1e-7, name
        np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max() + 1e-7, rtol=0,
                                   err_msg=name)


@pytest.mark.parametrize("version, impl", CASES)
def test_packed_row_equals_documents_alone(version, impl):
    """Packed rows traced inside jit/grad (as the trainer runs them) against every document
    run alone: logits, the returned state, and the gradients w.r.t. every parameter and the
    state passed in of a loss over the rows (for the documents, the sum of theirs). Row 1
    resets at t = 0, so the state passed in must be discarded there (zero gradient)."""
    model = _tiny(version, impl)
    tokens, resets = _batch(model.config.vocab_size)
    _, state0 = model(np.random.default_rng(2).integers(0, 256, (B, 4)))  # a lived-in state
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, 256)), jnp.float32)
    graphdef, params = nnx.split(model)

    def loss(params, state0, packed):
        m = nnx.merge(graphdef, params)
        if packed:
            out, state = m(tokens, state0, resets=resets)
        else:
            out, state = _alone_as_rows(m, tokens, state0, resets), None
        return jnp.sum(out * weights), (out, state)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    g_packed, (logits, state) = grad(params, state0, True)
    g_alone, (want, _) = grad(params, state0, False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=ATOL, rtol=1e-5)
    _, last_alone = model(tokens[:, 16:])  # each row's last document, from the empty state
    _assert_state_close(state, last_alone)
    _assert_grads_close(g_packed, g_alone)


@pytest.mark.slow
def test_no_resets_is_one_document():
    """All-False resets (and a reset only at t = 0 from the empty state) change nothing."""
    model = _tiny("6", "scan")
    tokens, _ = _batch(256)
    plain, s_plain = model(tokens)
    for r in (np.zeros((B, T), bool), np.eye(1, T, dtype=bool).repeat(B, 0)):
        got, s = model(tokens, resets=r)
        np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=ATOL, rtol=0)
        _assert_state_close(s, s_plain)


def test_eager_call_longer_than_a_chunk_slices_resets():
    """T = 300 runs eagerly as chunks 256 + 16 + 16 + 4 + 4 + 4: documents start inside the
    first chunk, one token before the 256 boundary (a one-token document), on it, inside
    later chunks and on the last token; the call equals each document alone."""
    model = _tiny("7", "scan")
    T_long = 300
    tokens = np.random.default_rng(5).integers(0, 256, (1, T_long)).astype(np.int32)
    resets = np.zeros((1, T_long), bool)
    resets[0, [0, 100, 255, 256, 270, 290, 299]] = True
    logits, state = model(tokens, resets=resets)
    want = _alone_as_rows(model, tokens, model.init_state(1), resets)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=ATOL, rtol=1e-5)
    _assert_state_close(state, model(tokens[:, 299:])[1])


def test_compiles_once_per_chunk_shape():
    """resets given and resets None are one program each per chunk shape; new reset
    positions and repeats compile nothing."""
    model = _tiny("5.2", "scan")
    tokens, resets = _batch(256)
    model(tokens)
    model(tokens, resets=resets)
    with CompileCounter() as c:
        model(tokens)
        model(tokens, resets=~resets)
        model(tokens, resets=np.roll(resets, 3, axis=1))
    assert c.compiles == 0


@pytest.mark.parametrize("bad, what", [
    (np.zeros((B, T), np.int32), "int32"),
    (np.zeros((B, T - 1), bool), "(2, 19)"),
    (np.zeros((T,), bool), "(20,)"),
])
def test_bad_resets_are_a_clear_error(bad, what):
    model = _tiny("4", "scan")
    tokens, _ = _batch(256)
    with pytest.raises(ValueError, match=r"resets must be bool \[B, T\] like tokens") as e:
        model(tokens, resets=bad)
    assert what in str(e.value)
    with pytest.raises(ValueError, match="resets must be bool"):  # traced, as in training
        jax.jit(lambda t, r: model(t, resets=r))(tokens, bad)


# ---- real checkpoints, against the official implementation's logits ---------------------------
FIXTURES = {"rwkv4-tiny-660k": {}, "rwkv5.1-tiny-730k": {"ln_x_eps": 1e-5},
            "rwkv5.2-tiny-730k": {"ln_x_eps": 1e-5}, "rwkv6-tiny-3m": {}, "rwkv7-tiny-834k": {}}


@pytest.mark.parametrize("stem", [pytest.param(s, marks=[] if s.startswith(("rwkv4", "rwkv7"))
                                              else [pytest.mark.slow]) for s in FIXTURES])
def test_fixture_packed_row_matches_official_logits(stem, fixtures_dir):
    """A row of three documents (``"in``, 60 bytes of Shakespeare, ``"in`` again): each
    part's logits are the official package's for that document alone (1e-4, the parity
    tolerance), and the returned state is that of ``"in`` alone."""
    refs = np.load(fixtures_dir / "reference-logits.npz")
    model = rwkv_jax.load(fixtures_dir / f"{stem}.pth", **FIXTURES[stem])
    quote, quote_logits = refs[f"{stem}/quote_in/tokens"], refs[f"{stem}/quote_in/logits"]
    text = refs[f"{stem}/shakespeare128/tokens"][:60]
    text_logits = refs[f"{stem}/shakespeare128/logits"][:60]
    tokens = np.concatenate([quote, text, quote])[None]
    resets = np.zeros(tokens.shape, bool)
    resets[0, [0, 3, 63]] = True
    logits, state = model(tokens, resets=resets)
    want = np.concatenate([quote_logits, text_logits, quote_logits])
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4, rtol=0)
    _, alone = model(quote[None])
    _assert_state_close(state, alone, atol=1e-5)


# ---- training on packed rows --------------------------------------------------------------------
def _documents(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 8)))}) + "\n")
    return path


def _overrides(tmp_path, *extra):
    return [f"out_dir={tmp_path / 'run'}", f"data.path={_documents(tmp_path / 'docs.jsonl')}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.pack=true", "model.version=7",
            "model.n_layer=2", "model.n_embd=32", "model.head_size=16", "data.ctx_len=32",
            "train.batch_size=4", "train.max_steps=3", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=3", "schedule.warmup_steps=1",
            "logging.progress=false", "train.sample_tokens=0", *extra]


def test_packed_training_from_the_cli(tmp_path):
    """``data.pack=true`` trains from the CLI with a finite loss, and step 1's logged loss is
    the masked cross-entropy of the documents of step 0's rows, each run alone from the
    empty state with the initial parameters (computed here by hand, in numpy)."""
    overrides = _overrides(tmp_path)
    assert main(["train", *overrides]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines() if "train_loss" in line]
    assert rows and all(np.isfinite(r["train_loss"]) for r in rows)
    logged = next(r["train_loss"] for r in rows if r["step"] == 1)

    # the same run's step-0 batch and initial model, rebuilt (a fresh out_dir: no resume)
    trainer = Trainer(load_config(None, [*overrides, f"out_dir={tmp_path / 'fresh'}"]))
    batch = trainer.batches.train_batch(0)
    assert batch.resets is not None and batch.resets.shape == batch.x.shape
    x, y, mask, resets = (np.asarray(a[0]) for a in batch)
    assert resets[:, 0].all() and resets[:, 1:].any()  # several documents per row
    model = trainer.model()
    total, weight = 0.0, 0.0
    for b in range(x.shape[0]):
        for s, e in spans(resets[b]):
            logits, _ = model(x[b:b + 1, s:e])
            z = np.asarray(logits[0], np.float64)
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            nll = lse - z[np.arange(e - s), y[b, s:e]]
            total += float((nll * mask[b, s:e]).sum())
            weight += float(mask[b, s:e].sum())
    # the mask drops each document's last pair (its target is the next document's first token)
    assert weight < mask.size
    np.testing.assert_allclose(logged, total / weight, rtol=2e-5)

    # and loss_fn on the packed batch gives it too (what the compiled step differentiates)
    micro = step_mod.Batch(*(jnp.asarray(a) for a in (x, y, mask)), jnp.asarray(resets))
    got = step_mod.loss_fn(trainer.state.params, trainer.state.frozen, micro,
                           jax.random.key(0), spec=trainer.spec)
    np.testing.assert_allclose(float(got), total / weight, rtol=2e-5)


def test_pack_with_state_tuning_is_a_config_error(tmp_path, fixtures_dir):
    cfg = load_config(None, [*_overrides(tmp_path), f"finetune.init_from="
                             f"{fixtures_dir / 'rwkv7-tiny-834k.pth'}", "finetune.method=state"])
    with pytest.raises(ConfigError, match="data.pack: .*finetune.method=state"):
        Trainer(cfg)
