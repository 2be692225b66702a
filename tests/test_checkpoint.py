"""Checkpoint round trips, Hugging Face names, config inference and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax import CheckpointError, RWKVConfig
from rwkv_jax.checkpoint import (model_tensors, read_tensors, to_fla_names, to_hf_names,
                                 to_official_names)
from rwkv_jax.io.pth import write_pth

TOKENS = jnp.asarray(np.arange(40, dtype=np.int32) * 7 % 256)[None]


@pytest.fixture(scope="module")
def tiny4(fixtures_dir):
    return rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth")


def _logits(model):
    return np.asarray(model(TOKENS)[0])


def test_infer_config_from_shapes(tiny4):
    cfg = tiny4.config
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_size) == \
        ("4", 4, 128, 256, 256)  # this fixture has F = 2C


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_identical(tiny4, tmp_path, suffix):
    path = rwkv_jax.save(tiny4, tmp_path / f"m{suffix}")
    again = rwkv_jax.load(path)
    assert again.config == tiny4.config
    np.testing.assert_array_equal(_logits(again), _logits(tiny4))
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_params_round_trip(tiny4, tmp_path):
    m = rwkv_jax.load(rwkv_jax.save(tiny4, tmp_path / "a.pth"), param_dtype="bfloat16")
    tensors = model_tensors(m)
    assert all(v.dtype == jnp.bfloat16 for v in tensors.values())
    back = read_tensors(rwkv_jax.save(m, tmp_path / "b.pth"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k].astype(np.float32), v.astype(np.float32))


def test_hf_names_round_trip(tiny4, tmp_path):
    official = model_tensors(tiny4)
    hf = to_hf_names(official, "4")
    assert "rwkv.embeddings.weight" in hf and "head.weight" in hf
    assert "rwkv.blocks.0.pre_ln.weight" in hf
    assert "rwkv.blocks.1.attention.time_mix_key" in hf
    assert "rwkv.blocks.1.feed_forward.time_mix_receptance" in hf
    assert "rwkv.blocks.1.attention.time_decay" in hf
    assert to_official_names(hf).keys() == official.keys()
    path = rwkv_jax.save(tiny4, tmp_path / "hf.safetensors", names="hf")
    np.testing.assert_array_equal(_logits(rwkv_jax.load(path)), _logits(tiny4))


def test_run_directory(tiny4, tmp_path):
    rwkv_jax.save(tiny4, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(_logits(rwkv_jax.load(tmp_path)), _logits(tiny4))


def test_overrides(fixtures_dir):
    m = rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth", wkv_impl="associative",
                      compute_dtype="bfloat16")
    assert m.config.wkv_impl == "associative" and m.config.compute_dtype == "bfloat16"
    with pytest.raises(CheckpointError, match="unknown config field.*no_such_thing"):
        rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth", no_such_thing=1)
    with pytest.raises(CheckpointError, match="wkv_impl"):
        rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth", wkv_impl="fastest")


def test_every_mismatch_listed_at_once(tiny4, tmp_path):
    t = model_tensors(tiny4)
    del t["blocks.2.att.key.weight"]
    del t["ln_out.bias"]
    t["blocks.1.att.time_first"] = np.zeros((7,), np.float32)
    t["blocks.0.att.surprise"] = np.zeros((3,), np.float32)
    path = tmp_path / "bad.pth"
    write_pth(t, path)
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys: blocks.2.att.key.weight, ln_out.bias" in msg
    assert "unknown keys: blocks.0.att.surprise" in msg
    assert "blocks.1.att.time_first: shape (7,), expected (128,)" in msg


def test_not_rwkv_and_corrupt_files(fixtures_dir, tmp_path):
    from safetensors.numpy import save_file
    save_file({"foo": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint: no 'emb.weight'"):
        rwkv_jax.load(tmp_path / "x.safetensors")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        rwkv_jax.load(tmp_path / "empty.pth")
    (tmp_path / "noise.bin").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        rwkv_jax.load(tmp_path / "noise.bin")
    data = (fixtures_dir / "rwkv4-tiny-660k.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="(?i)truncated|corrupt"):
        rwkv_jax.load(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        rwkv_jax.load(tmp_path / "absent.pth")
    full = tmp_path / "s.safetensors"
    rwkv_jax.save(rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth"), full)
    raw = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        rwkv_jax.load(tmp_path / "cut.safetensors")


def test_hostile_pickle_refused_payload_not_run(tmp_path):
    """A .pth whose pickle calls os.system is refused; the command never runs."""
    import pickle
    import zipfile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"emb.weight": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="system"):
        rwkv_jax.load(path)
    assert not marker.exists()


def test_official_init_from_scratch():
    cfg = RWKVConfig.tiny(n_layer=3, n_embd=32)
    m = rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))
    t = model_tensors(m)
    C = cfg.n_embd
    h = np.arange(C) / (C - 1)
    for i in range(3):
        r01 = i / 2
        np.testing.assert_allclose(t[f"blocks.{i}.att.time_decay"],
                                   -5 + 8 * h ** (0.7 + 1.3 * r01), rtol=1e-6)
        for name in ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"):
            assert not np.any(t[f"blocks.{i}.{name}.weight"])
    zig = ((np.arange(C) + 1) % 3) - 1
    np.testing.assert_allclose(t["blocks.0.att.time_first"], np.log(0.3) + 0.5 * zig, rtol=1e-6)
    np.testing.assert_allclose(t["blocks.1.att.time_mix_k"].ravel(),
                               (np.arange(C) / C) ** (1 - 1 / 3), rtol=1e-6)
    w = t["blocks.0.ffn.key.weight"]  # [4C, C] orthogonal with gain 2: columns have norm 2
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 2.0, rtol=1e-5)
    assert np.abs(t["emb.weight"]).max() <= 1e-4
    logits, _ = m(TOKENS)
    assert logits.shape == (1, 40, 256) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.torch
def test_saved_pth_loads_in_official_package(tiny4, tmp_path):
    """Our .pth loads in the official `rwkv` package (torch) with the same logits."""
    pytest.importorskip("torch", reason="torch not installed (pip install torch rwkv==0.8.32)")
    pytest.importorskip("rwkv", reason="official rwkv package not installed")
    path = rwkv_jax.save(tiny4, tmp_path / "ours.pth")
    toks = [int(t) for t in np.asarray(TOKENS[0])]
    script = textwrap.dedent(f"""
        import os, json, numpy as np
        os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
        from rwkv.model import RWKV
        m = RWKV(model={str(path)[:-4]!r}, strategy="cpu fp32", verbose=False)
        out, _ = m.forward({toks}, None, full_output=True)
        np.save({str(tmp_path / "official.npy")!r}, out.float().numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    official = np.load(tmp_path / "official.npy").reshape(len(toks), -1)
    np.testing.assert_allclose(_logits(tiny4)[0], official, atol=1e-4, rtol=0)


def test_fla_names_rwkv7_round_trip(fixtures_dir, tmp_path):
    """flash-linear-attention's RWKV-7 layout (its convert_from_rwkv7.py): renamed parts,
    transposed LoRA matrices, x0 as the lora.2 bias, squeezed vectors except attn.x_*."""
    m = rwkv_jax.load(fixtures_dir / "rwkv7-tiny-834k.pth")
    official = model_tensors(m)
    fla = to_hf_names(official, "7")
    assert fla["model.layers.1.attn.w_lora.lora.0.weight"].shape == (32, 64)  # w1.T
    np.testing.assert_array_equal(fla["model.layers.1.attn.w_lora.lora.0.weight"],
                                  official["blocks.1.att.w1"].T)
    np.testing.assert_array_equal(fla["model.layers.1.attn.a_lora.lora.2.bias"],
                                  official["blocks.1.att.a0"].reshape(-1))
    assert fla["model.layers.1.attn.x_r"].shape == (1, 1, 64)
    assert fla["model.layers.1.attn.k_k"].shape == (64,)
    assert fla["model.layers.1.ffn.x_k"].shape == (64,)
    assert "model.layers.0.pre_norm.weight" in fla and "lm_head.weight" in fla
    assert "model.layers.2.attn.g_norm.weight" in fla and "model.layers.2.attn.o_proj.weight" in fla
    path = rwkv_jax.save(m, tmp_path / "fla.safetensors", names="hf")
    x = TOKENS[:, :12]
    np.testing.assert_array_equal(np.asarray(rwkv_jax.load(path)(x)[0]), np.asarray(m(x)[0]))


def test_hf_names_rwkv6_round_trip(fixtures_dir, tmp_path):
    """HF remote-code RWKV-6 names (reference §4.2): official names under rwkv./attention/
    feed_forward/embeddings/pre_ln; head.weight unchanged."""
    m = rwkv_jax.load(fixtures_dir / "rwkv6-tiny-3m.pth")
    hf = to_hf_names(model_tensors(m), "6")
    for key in ("rwkv.embeddings.weight", "rwkv.blocks.0.pre_ln.weight", "head.weight",
                "rwkv.blocks.1.attention.time_maa_w1", "rwkv.blocks.1.attention.ln_x.weight",
                "rwkv.blocks.1.feed_forward.time_maa_k", "rwkv.ln_out.bias"):
        assert key in hf, key
    path = rwkv_jax.save(m, tmp_path / "hf6.safetensors", names="hf")
    x = TOKENS[:, :12]
    np.testing.assert_array_equal(np.asarray(rwkv_jax.load(path)(x)[0]), np.asarray(m(x)[0]))


# flash-linear-attention RWKV-6 names, as written by fla-org/flash-linear-attention
# utils/convert_from_rwkv6.py into the modules of fla/layers/rwkv6.py (RWKV6Attention, LerpLinear,
# DDLerpLinear, LoRA) and fla/models/rwkv6/modeling_rwkv6.py (RWKV6FeedForward, RWKV6Block,
# RWKV6Model, RWKV6ForCausalLM), commit bc3b101dcb71.
_FLA6_LAYER_KEYS = {  # key after "model.layers.N." -> shape for C=128, D_mix=32, D_decay=64
    "attn_norm.weight": (128,), "attn_norm.bias": (128,),
    "attn.x_proj.0.mu": (128,),                      # time_maa_x.view(-1)
    "attn.x_proj.0.linear.weight": (160, 128),       # time_maa_w1 re-ordered, transposed
    "attn.x_proj.2.weight": (128, 160),              # time_maa_w2 re-ordered, flattened, .t()
    "attn.x_bias": (5, 128),                         # stack(maa_r, maa_w, maa_k, maa_v, maa_g)
    "attn.r_proj.linear.weight": (128, 128), "attn.k_proj.linear.weight": (128, 128),
    "attn.v_proj.linear.weight": (128, 128), "attn.g_proj.linear.weight": (128, 128),
    "attn.w_proj.linear.lora.0.weight": (64, 128),   # time_decay_w1.t()
    "attn.w_proj.linear.lora.2.weight": (128, 64),   # time_decay_w2.t()
    "attn.w_proj.linear.lora.2.bias": (128,),        # time_decay.view(-1)
    "attn.bonus": (16, 8),                           # time_faaaa
    "attn.g_norm.weight": (128,), "attn.g_norm.bias": (128,),  # ln_x
    "attn.o_proj.weight": (128, 128),
    "ffn_norm.weight": (128,), "ffn_norm.bias": (128,),
    "ffn.key.mu": (128,), "ffn.key.linear.weight": (448, 128),  # time_maa_k, key
    "ffn.receptance.mu": (128,), "ffn.receptance.linear.weight": (128, 128),
    "ffn.value.weight": (128, 448),
}


@pytest.fixture(scope="module")
def tiny6(fixtures_dir):
    return rwkv_jax.load(fixtures_dir / "rwkv6-tiny-3m.pth")


def test_fla_names_rwkv6_round_trip(tiny6, tmp_path):
    official = model_tensors(tiny6)
    fla = to_fla_names(official, "6")
    want = {"model.embeddings.weight": (256, 128), "model.norm.weight": (128,),
            "model.norm.bias": (128,), "lm_head.weight": (256, 128),
            "model.layers.0.pre_norm.weight": (128,), "model.layers.0.pre_norm.bias": (128,)}
    want.update({f"model.layers.{i}.{k}": s for i in range(12) for k, s in
                 _FLA6_LAYER_KEYS.items()})
    assert {k: v.shape for k, v in fla.items()} == want
    a = "model.layers.3.attn."
    np.testing.assert_array_equal(fla[a + "x_bias"][0], official["blocks.3.att.time_maa_r"].ravel())
    np.testing.assert_array_equal(fla[a + "x_bias"][1], official["blocks.3.att.time_maa_w"].ravel())
    np.testing.assert_array_equal(fla[a + "w_proj.linear.lora.0.weight"],
                                  official["blocks.3.att.time_decay_w1"].T)
    np.testing.assert_array_equal(fla[a + "w_proj.linear.lora.2.bias"],
                                  official["blocks.3.att.time_decay"].ravel())
    np.testing.assert_array_equal(fla[a + "bonus"], official["blocks.3.att.time_faaaa"])
    np.testing.assert_array_equal(fla["model.layers.3.ffn.key.mu"],
                                  official["blocks.3.ffn.time_maa_k"].ravel())
    back = to_official_names(fla)  # exact inverse: keys, shapes, dtypes and values
    assert back.keys() == official.keys()
    for k, v in official.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    path = rwkv_jax.save(tiny6, tmp_path / "fla6.safetensors", names="fla")
    assert set(read_tensors(path)) == set(want)
    again = rwkv_jax.load(path)
    assert again.config == tiny6.config
    x = TOKENS[:, :16]
    np.testing.assert_array_equal(np.asarray(again(x)[0]), np.asarray(tiny6(x)[0]))
    with pytest.raises(ValueError, match="RWKV-6 and RWKV-7"):
        to_fla_names(official, "5.2")


def test_fla_names_rwkv6_mix_order():
    """time_maa_w1 / time_maa_w2 / time_maa_{r,w,k,v,g} land where FLA's converter puts them:
    ``ww, wk, wv, wr, wg = time_maa_w1.view(C, 5, -1).unbind(-2);
    cat((wr, ww, wk, wv, wg), -1).t()``, the same for ``time_maa_w2.unbind(0)`` with
    ``cat(..., 0).t()``, and ``x_bias = stack((maa_r, maa_w, maa_k, maa_v, maa_g))``."""
    C, D = 3, 2
    c, d = np.arange(C), np.arange(D)
    official_order = "wkvrg"  # official x060 unbind order of the five mixes
    # entry = 100 * official block + 10 * row-within-block + channel: every slice distinct
    w1 = (100 * np.arange(5)[None, :, None] + 10 * d[None, None, :] + c[:, None, None])
    w1 = w1.reshape(C, 5 * D).astype(np.float32)                        # [C, 5*D]
    w2 = (100 * np.arange(5)[:, None, None] + 10 * d[None, :, None]
          + c[None, None, :]).astype(np.float32)                         # [5, D, C]
    t = {"blocks.0.att.time_maa_w1": w1, "blocks.0.att.time_maa_w2": w2}
    t.update({f"blocks.0.att.time_maa_{m}": np.full((1, 1, C), 1000 + i, np.float32)
              for i, m in enumerate(official_order)})
    fla = to_fla_names(t, "6")
    x0 = fla["model.layers.0.attn.x_proj.0.linear.weight"]               # [5*D, C]
    x2 = fla["model.layers.0.attn.x_proj.2.weight"]                      # [C, 5*D]
    assert x0.shape == (5 * D, C) and x2.shape == (C, 5 * D)
    # FLA block n holds mix "rwkvg"[n], i.e. official blocks (r=3, w=0, k=1, v=2, g=4)
    for n, official_block in enumerate([3, 0, 1, 2, 4]):
        for dd in range(D):
            np.testing.assert_array_equal(x0[n * D + dd], 100 * official_block + 10 * dd + c)
            np.testing.assert_array_equal(x2[:, n * D + dd], 100 * official_block + 10 * dd + c)
    np.testing.assert_array_equal(fla["model.layers.0.attn.x_bias"][:, 0],
                                  [1003, 1000, 1001, 1002, 1004])  # r, w, k, v, g
    back = to_official_names(fla)
    assert back.keys() == t.keys()
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    # and the renamed tensors compute the same mixes: FLA's forward (fla/layers/rwkv6.py:
    # x_proj[0] = LerpLinear(mu), view(..., 5, D), tanh, einsum with x_proj[2].weight
    # .view(C, 5, -1), + x_bias, unbind -> r, w, k, v, g) vs the official ddlerp (§4.1)
    rng = np.random.default_rng(0)
    C, D, T = 8, 4, 5
    t = {"blocks.0.att.time_maa_w1": rng.normal(size=(C, 5 * D)),
         "blocks.0.att.time_maa_w2": rng.normal(size=(5, D, C)),
         "blocks.0.att.time_maa_x": rng.normal(size=(1, 1, C))}
    t.update({f"blocks.0.att.time_maa_{m}": rng.normal(size=(1, 1, C)) for m in official_order})
    x, dx = rng.normal(size=(T, C)), rng.normal(size=(T, C))
    xxx = x + dx * t["blocks.0.att.time_maa_x"][0]
    mix = np.einsum("tfd,fdc->tfc", np.tanh(xxx @ t["blocks.0.att.time_maa_w1"]).reshape(T, 5, D),
                    t["blocks.0.att.time_maa_w2"])
    official_mixes = {m: x + dx * (t[f"blocks.0.att.time_maa_{m}"][0] + mix[:, f])
                      for f, m in enumerate(official_order)}
    fla = {k.removeprefix("model.layers.0.attn."): v for k, v in to_fla_names(t, "6").items()}
    h = np.tanh(((x + dx * fla["x_proj.0.mu"]) @ fla["x_proj.0.linear.weight"].T).reshape(T, 5, D))
    h = np.einsum("tnr,hnr->tnh", h, fla["x_proj.2.weight"].reshape(C, 5, D)) + fla["x_bias"]
    for n, m in enumerate("rwkvg"):
        np.testing.assert_allclose(x + dx * h[:, n], official_mixes[m], rtol=1e-12, err_msg=m)


def test_fla_names_rwkv6_mismatches_listed_at_once(tiny6, tmp_path):
    from safetensors.numpy import save_file
    fla = to_fla_names(model_tensors(tiny6), "6")
    del fla["model.layers.1.attn.bonus"]
    fla["model.layers.2.attn.surprise"] = np.zeros(3, np.float32)
    fla["model.layers.4.attn.w_proj.linear.lora.2.bias"] = np.zeros(7, np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(fla, str(path))
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(path)
    msg = str(e.value)
    assert "unknown keys: model.layers.2.attn.surprise" in msg
    assert "missing keys: blocks.1.att.time_faaaa" in msg
    assert "blocks.4.att.time_decay: shape (1, 1, 7), expected (1, 1, 128)" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_read_tensors_memory_maps(tiny4, tmp_path, suffix):
    """Both formats are read as views of the mapped file (no copy until used); the safety
    checks must not have turned the fast path into a full read."""
    import mmap
    path = rwkv_jax.save(tiny4, tmp_path / f"m{suffix}")
    tensors = read_tensors(path)
    for k, v in tensors.items():
        base = v
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        assert isinstance(base, mmap.mmap), k
