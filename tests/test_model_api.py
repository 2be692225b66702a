"""The model as a library: ``model(tokens, state)`` called the way the README shows.

Compiled once per shape however it is called, bounded memory over many calls, prompts of
any length without a compile per length, ``logits_to_keep``, state checks, and the cached
graph walk noticing structure changes.
"""

from __future__ import annotations

import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import CompileCounter
from flax import nnx

import rwkv_jax
from rwkv_jax.model.lm import PREFILL_SIZES, padded_length, prefill_chunks
from rwkv_jax.tokenizers import ByteTokenizer

CFG7 = rwkv_jax.RWKVConfig.tiny("7", n_layer=2)


@pytest.fixture(scope="module")
def model():
    return rwkv_jax.RWKV(CFG7, rngs=nnx.Rngs(0))


def _tokens(n, seed=0, batch=1):
    return np.random.default_rng(seed).integers(0, 256, (batch, n)).astype(np.int32)


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_prefill_chunks_cover_every_length():
    for n in (1, 3, 77, 1000, 5000):
        sizes = prefill_chunks(n)
        assert sum(sizes) == n and set(sizes) <= set(PREFILL_SIZES)
        assert sizes == sorted(sizes, reverse=True)


def test_new_lengths_compile_nothing_after_warmup(model):
    """Once every chunk program has run, prompts of new lengths reuse those programs.

    With ``logits_to_keep=1`` a chunk runs as one of three programs: no head (an earlier
    chunk), the head on its last position, or the head on all of it (a final chunk of 1).
    A short call from the empty state runs as one left-padded chunk with a reset."""
    empty = model.init_state(1)  # an explicit state: chunked greedily, never padded
    for size in PREFILL_SIZES[1:]:  # 512 ... 1 (1024 is only needed beyond 1024)
        model(_tokens(size), logits_to_keep=1)             # the head on the last position
        model(_tokens(size + 1), empty, logits_to_keep=1)  # no head, then a final chunk of 1
        if padded_length(size - 1) == size:
            model(_tokens(size - 1), logits_to_keep=1)     # padded to this size
    with CompileCounter() as c:
        for n in (5, 10, 50, 100, 333, 999):
            logits, _ = model(_tokens(n, seed=n), logits_to_keep=1)
            assert logits.shape == (1, 1, 256)
    assert c.compiles == 0


def test_short_call_runs_as_one_padded_chunk(model, monkeypatch):
    """From the empty state a short call is one program call, left-padded with a reset at
    its first token, and equals the greedy chunks, a traced whole call and token by token."""
    from rwkv_jax.model import lm
    assert [padded_length(n) for n in (1, 3, 14, 33, 64, 65)] == [None, 4, 16, 64, None, None]
    x = _tokens(14, seed=3, batch=2)
    calls = []
    real = lm._apply
    monkeypatch.setattr(lm, "_apply", lambda *a: calls.append(a[2].shape) or real(*a))
    padded, s_padded = model(x)
    last, _ = model(x, logits_to_keep=3)
    greedy, s_greedy = model(x, model.init_state(2))  # an explicit state: 8 + 4 + 2
    assert calls == [(2, 16), (2, 16), (2, 8), (2, 4), (2, 2)]
    monkeypatch.undo()
    whole, s_whole = nnx.jit(lambda m, t: m(t))(model, x)
    steps, st = [], None
    for t in range(x.shape[1]):
        out, st = model(x[:, t:t + 1], st)
        steps.append(np.asarray(out))
    assert padded.shape == (2, 14, 256) and last.shape == (2, 3, 256)
    for ref in (greedy, whole, np.concatenate(steps, axis=1)):
        np.testing.assert_allclose(np.asarray(padded), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(last), np.asarray(padded)[:, -3:], atol=1e-6)
    for ref in (s_greedy, s_whole, st):
        for a, b in zip(jax.tree.leaves(s_padded), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_split_equals_whole_for_any_length(model):
    x = _tokens(333, seed=1)
    whole, s_whole = nnx.jit(lambda m, t: m(t))(model, x)  # one traced call, unchunked
    eager, s_eager = model(x)                              # chunked 256 + 64 + 3 x 4 + 1
    np.testing.assert_allclose(np.asarray(eager), np.asarray(whole), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_eager), jax.tree.leaves(s_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_memory_mappings_flat_over_500_calls(model):
    state = None
    for _ in range(20):  # warm-up: compile the one-token call
        _, state = model(_tokens(1), state)
    before, rss0 = _maps(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with CompileCounter() as c:
        for i in range(500):
            _, state = model(_tokens(1, seed=i), state)
        state = model.init_state(1)
    jax.block_until_ready(state)
    grown = _maps() - before
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert c.compiles == 0
    assert grown < 10, f"{grown} new memory mappings over 500 calls"
    assert rss_kb < 50_000, f"peak RSS grew by {rss_kb} kB over 500 calls"


def test_state_helpers_compile_once(model, tmp_path):
    path = tmp_path / "s.npz"
    _, state = model(_tokens(4))
    rwkv_jax.save_state(path, state, model)
    rwkv_jax.load_state(path, model)
    model.init_state(3)
    with CompileCounter() as c:
        for _ in range(5):
            model.init_state(3)
            rwkv_jax.save_state(path, state, model)
            loaded = rwkv_jax.load_state(path, model)
            model(_tokens(4), loaded)
    assert c.compiles == 0


def test_generate_and_stream_compile_once(model):
    tok = ByteTokenizer()
    rwkv_jax.generate(model, tok, "Hello", max_tokens=4, temperature=0)
    list(rwkv_jax.stream(model, tok, ["Hi there", "Hi you!!"], max_tokens=4, temperature=0.8))
    with CompileCounter() as c:
        rwkv_jax.generate(model, tok, "Howdy", max_tokens=8, temperature=0)
        list(rwkv_jax.stream(model, tok, ["Yo there", "Hey you!"], max_tokens=8,
                             temperature=1.2, top_p=0.5))
    assert c.compiles == 0


def test_logits_to_keep_validated(model):
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(_tokens(3), logits_to_keep=bad)


def test_bad_tokens_and_state_are_clear_errors(model):
    with pytest.raises(ValueError, match="token ids must be in 0..255"):
        model(np.array([[1, 256]], np.int32))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="integers"):
        model(np.array([[1.0, 2.0]], np.float32))
    _, state = model(_tokens(2, batch=2))
    with pytest.raises(ValueError, match="state does not fit"):
        model(_tokens(2), state)


def test_parameter_updates_and_structure_changes_are_seen():
    m = rwkv_jax.RWKV(CFG7, rngs=nnx.Rngs(1))
    x = _tokens(5)
    a, _ = m(x)
    m.head.weight[...] = jnp.zeros_like(m.head.weight[...])     # in-place update
    b, _ = m(x)
    assert float(jnp.abs(b).max()) == 0.0 and float(jnp.abs(a).max()) > 0
    m.head.weight = nnx.Param(jnp.ones_like(m.head.weight[...]))  # a new Variable
    c, _ = m(x)
    assert float(jnp.abs(c).max()) > 0


def test_call_inside_vmap_and_grad_wrt_state(model):
    """Traced contexts other than jit: vmap over a batch of sequences, grad w.r.t. a state."""
    x = _tokens(6, batch=3)
    graphdef, params = nnx.split(model)
    # RWKV-7's init zeroes the output projections, so the state would not reach the logits
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                          for p, k in zip(leaves, keys)])
    model = nnx.merge(graphdef, params)
    _, s0 = model(x)

    def last_logit_sum(state):
        logits, _ = nnx.merge(graphdef, params)(x, state)
        return jnp.sum(logits[:, -1])

    g = jax.grad(last_logit_sum)(s0)
    assert jax.tree.structure(g) == jax.tree.structure(s0)
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(g))
    per_row = jax.vmap(lambda t: nnx.merge(graphdef, params)(t[None])[0][0])(x)
    full, _ = model(x)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_call_with_concrete_inputs_inside_a_trace(model):
    """Inside jit, a call whose own arguments are all concrete (the traced value reaches the
    computation some other way) runs inline instead of through the eager path."""
    x = _tokens(5)
    want, _ = model(x)
    got = jax.jit(lambda scale: model(x)[0] * scale)(2.0)
    np.testing.assert_allclose(np.asarray(got), 2.0 * np.asarray(want), rtol=1e-6, atol=1e-6)
