"""LoRA adapters (rwkv_jax.lora): attach changes nothing, the low-rank path and its merge
against a numpy transcription, dropout only while training, files and their errors."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax import lora
from rwkv_jax.checkpoint import CheckpointError, model_tensors
from rwkv_jax.model.layers import Linear, dropout_key

TOKENS = np.asarray([list(b"To be, or not to")], np.int32)  # 16: one compiled chunk


def _tiny(version="7", seed=0):
    return rwkv_jax.RWKV(rwkv_jax.RWKVConfig.tiny(version), rngs=nnx.Rngs(seed))


def _randomize_b(model, seed=1):
    """Give every adapter a non-zero B (a trained adapter), returned by name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, lin in lora.adapted(model).items():
        b = rng.standard_normal(lin.lora_B.shape).astype(np.float32) * 0.1
        lin.lora_B.set_value(jnp.asarray(b))
        out[name] = b
    return out


@pytest.mark.parametrize("version", ["4", "5.1", "5.2", "6", "7"])
def test_default_targets_are_the_projections_and_attach_changes_nothing(version):
    model = _tiny(version)
    before, _ = model(TOKENS)
    names = lora.attach(model, rank=4, alpha=8)
    expected = {"4": {"receptance", "key", "value", "output"},
                "5.1": {"receptance", "key", "value", "output"},
                "5.2": {"receptance", "key", "value", "output", "gate"},
                "6": {"receptance", "key", "value", "output", "gate"},
                "7": {"receptance", "key", "value", "output"}}[version]
    ffn = {"key", "value"} | ({"receptance"} if version != "7" else set())
    want = {f"blocks.{i}.{part}.{p}.weight" for i in range(2)
            for part, ps in (("att", expected), ("ffn", ffn)) for p in ps}
    assert set(names) == want
    after, _ = model(TOKENS)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))  # B = 0: exact
    lin = lora.adapted(model)["blocks.0.att.key.weight"]
    assert lin.lora_A.shape == (4, 64) and lin.lora_B.shape == (64, 4)
    assert np.abs(np.asarray(lin.lora_A[...])).max() <= 1 / 8  # U(±1/sqrt(in))


def test_low_rank_path_and_merge_match_numpy():
    model = _tiny("6")
    lora.attach(model, rank=3, alpha=6.0)
    b = _randomize_b(model)
    lin = lora.adapted(model)["blocks.1.att.value.weight"]
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    w = np.asarray(lin.weight[...], np.float64)
    a = np.asarray(lin.lora_A[...], np.float64)
    want = x @ w.T + 2.0 * (x @ a.T) @ b["blocks.1.att.value.weight"].astype(np.float64).T
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)

    merged = lora.merge(model)
    assert not lora.adapted(merged) and lora.adapted(model)  # the input keeps its adapters
    tm, tb = model_tensors(merged), model_tensors(model)
    name = "blocks.1.att.value.weight"
    np.testing.assert_allclose(tm[name], w + 2.0 * b[name] @ a, rtol=1e-6, atol=1e-6)
    assert np.array_equal(tm["blocks.0.ln1.weight"], tb["blocks.0.ln1.weight"])
    assert not any(k.endswith((".lora_A", ".lora_B")) for k in tm)
    la, _ = model(TOKENS)
    lm, _ = merged(TOKENS)
    np.testing.assert_allclose(np.asarray(lm), np.asarray(la), atol=1e-5)


def test_attach_errors_name_the_target():
    model = _tiny("7")
    with pytest.raises(ValueError, match=r"'.*ln1.*' matches no Linear weight of this model "
                                         r"\(it matches blocks\.0\.ln1\.weight, which is not a "
                                         r"Linear weight\)"):
        lora.attach(model, rank=2, alpha=2, targets=[r".*\.ln1\.weight"])
    with pytest.raises(ValueError, match="'nothing' matches no Linear weight"):
        lora.attach(model, rank=2, alpha=2, targets=["nothing"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.attach(model, rank=0, alpha=2)
    lora.attach(model, rank=2, alpha=2, targets=["head.weight"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.attach(model, rank=2, alpha=2)


def test_dropout_only_inside_the_training_context():
    lin = Linear(8, 4, init=jnp.ones((4, 8)), compute_dtype=jnp.float32)
    lora._set_adapter(lin, np.ones((2, 8)), np.ones((4, 2)), 1.0, 0.5, 0)
    x = jnp.ones((1, 3, 8))
    plain = np.asarray(lin(x))
    np.testing.assert_allclose(plain, 8 + 16, rtol=1e-6)  # no dropout outside the context

    def f(key):
        with dropout_key(key):
            return lin(x)

    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, a2, b = (np.asarray(jax.jit(f)(k)) for k in (k1, k1, k2))
    assert np.array_equal(a, a2) and not np.array_equal(a, b)  # keyed, deterministic
    assert not np.allclose(a, plain)
    # inverted dropout keeps the expectation: mean of the low-rank part over many keys
    many = np.stack([np.asarray(jax.jit(f)(jax.random.key(i))) - 8 for i in range(200)])
    assert abs(many.mean() / 16 - 1) < 0.1


def test_adapter_file_round_trip_and_errors(tmp_path, fixtures_dir):
    base = fixtures_dir / "rwkv7-tiny-834k.pth"
    model = rwkv_jax.load(base)
    lora.attach(model, rank=4, alpha=4, targets=[r"blocks\.\d+\.att\.key\.weight"])
    _randomize_b(model)
    path = lora.save(tmp_path / "lora.safetensors", model, base=base,
                     targets=[r"blocks\.\d+\.att\.key\.weight"])
    tensors, meta = lora.read(path)
    assert len(tensors) == 24 and meta["rank"] == 4 and meta["alpha"] == 4.0
    assert meta["base_name"] == base.name and meta["base_sha256"] == lora.file_sha256(base)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right base: no warning
        unmerged = rwkv_jax.load(base, lora=path)
    want, _ = model(TOKENS)
    got, _ = unmerged(TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # another base file: a warning naming the one the adapters were trained on
    other = tmp_path / "other.safetensors"
    plain = lora.merge(model)
    rwkv_jax.save(plain, other)
    with pytest.warns(UserWarning, match="trained on rwkv7-tiny-834k.pth"):
        lora.apply(lora.merge(model), path, base=other)

    # keys that fit no weight are named, all at once
    from safetensors.numpy import save_file
    bad = dict(tensors)
    bad["blocks.0.att.nokey.lora_A"] = tensors["blocks.0.att.key.lora_A"]
    bad["blocks.0.att.nokey.lora_B"] = tensors["blocks.0.att.key.lora_B"]
    bad["blocks.1.att.key.lora_B"] = np.zeros((3, 4), np.float32)
    del bad["blocks.2.att.key.lora_B"]
    bad["blocks.0.att.x_q"] = np.zeros((1, 1, 64), np.float32)
    raw = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in meta.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=raw)
    with pytest.raises(CheckpointError) as e:
        lora.apply(plain, tmp_path / "bad.safetensors")
    msg = str(e.value)
    for part in ("no Linear weight blocks.0.att.nokey.weight", "blocks.0.att.x_q: matches no "
                 "parameter", "blocks.1.att.key: lora_A (4, 64) / lora_B (3, 4) do not fit",
                 "blocks.2.att.key: has lora_A without its partner"):
        assert part in msg, msg
    assert not lora.adapted(plain)  # nothing was applied
    with pytest.raises(CheckpointError, match="not an rwkv-jax LoRA file"):
        lora.apply(plain, other)
