"""Evaluation (text loss / bits per byte with the state carried across windows, LAMBADA) and
the eval / convert / prepare commands, on the tiny RWKV-4 fixture."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax.checkpoint import read_tensors, to_official_names
from rwkv_jax.cli import main
from rwkv_jax.data import read_prepared
from rwkv_jax.evaluate import evaluate_text, evaluate_tokens, lambada
from rwkv_jax.tokenizers import ByteTokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Caf\u00e9 cr\u00e8me \u20ac5 \u2014 done.\n")
DOCS = ["the cat sat on the mat", "she sold sea shells by the sea shore",
        "all work and no play makes jack a dull boy", "to be or not to be"]
BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def model_path(fixtures_dir):
    return fixtures_dir / "rwkv4-tiny-660k.pth"


@pytest.fixture(scope="module")
def model(model_path):
    return rwkv_jax.load(model_path)


@nnx.jit
def _logp(model, tokens):
    logits, _ = model(tokens)
    return jax.nn.log_softmax(logits, axis=-1)


def _reference_nll(model, ids):
    logp = np.asarray(_logp(model, jnp.asarray([ids], jnp.int32)))[0]
    return -float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))


def test_windows_carry_the_state(model):
    ids = BYTES.encode(TEXT)
    one = evaluate_tokens(model, ids, ctx_len=len(ids), tokenizer=BYTES)
    windows = evaluate_tokens(model, ids, ctx_len=16, tokenizer=BYTES)  # last one padded
    ref = _reference_nll(model, ids)
    assert one.n_tokens == windows.n_tokens == len(ids) - 1
    assert one.nll_sum == pytest.approx(ref, rel=1e-5)
    assert windows.nll_sum == pytest.approx(ref, rel=1e-5)
    assert windows.n_correct == one.n_correct


def test_bits_per_byte_of_a_byte_model(model):
    res = evaluate_text(model, BYTES, TEXT, ctx_len=16)
    assert res.n_bytes == res.n_tokens == len(TEXT.encode()) - 1
    assert res.bits_per_byte == pytest.approx(res.loss / math.log(2), rel=1e-12)
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    assert 0 < res.accuracy < 1


def test_lambada_matches_a_direct_computation(model):
    res = lambada(model, BYTES, DOCS, batch_size=3)  # two batches, padded
    assert res.prefix == ()  # byte models: no end-of-text prefix
    logp_sum, correct = 0.0, 0
    for text in DOCS:
        ctx, last = text.rsplit(" ", 1)
        src, dst = BYTES.encode(ctx), BYTES.encode(" " + last)
        seq = src + dst
        logp = np.asarray(_logp(model, jnp.asarray([seq], jnp.int32)))[0]
        pos = range(len(src) - 1, len(seq) - 1)
        logp_sum += sum(float(logp[i, seq[i + 1]]) for i in pos)
        correct += all(int(logp[i].argmax()) == seq[i + 1] for i in pos)
    assert res.n_docs == len(DOCS) and res.n_correct == correct
    assert res.perplexity == pytest.approx(math.exp(-logp_sum / len(DOCS)), rel=1e-5)
    with_prefix = lambada(model, BYTES, DOCS, prefix=(0,), batch_size=3)
    assert with_prefix.prefix == (0,) and with_prefix.perplexity != res.perplexity


def test_eval_cli(model, model_path, tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", str(model_path), "--data", str(txt), "--ctx-len", "16",
                 "--json", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate_text(model, BYTES, TEXT, ctx_len=16)
    assert got["task"] == "text" and got["loss"] == pytest.approx(want.loss, rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-9)
    jl = tmp_path / "lambada.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert main(["eval", "--model", str(model_path), "--data", str(jl), "--batch-size", "3",
                 "-q"]) == 0
    out = capsys.readouterr().out
    ref = lambada(model, BYTES, DOCS, batch_size=3)
    assert out.startswith(f"lambada: accuracy {ref.accuracy:.4f} ({ref.n_correct}/4)")
    jl.write_text('{"txt": 1}\n')
    assert main(["eval", "--model", str(model_path), "--data", str(jl), "-q"]) == 2
    assert "lambada.jsonl:1" in capsys.readouterr().err


def test_convert_round_trips(model, model_path, tmp_path, capsys):
    st, run, back = tmp_path / "m.safetensors", tmp_path / "run", tmp_path / "back.pth"
    for src, dst in ((model_path, st), (st, run), (run, back)):
        assert main(["convert", str(src), str(dst), "-q"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert json.loads((run / "tokenizer.json").read_text()) == {"type": "bytes"}
    a, b = read_tensors(model_path), read_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    tokens = jnp.asarray([BYTES.encode("Speak, speak.")], jnp.int32)
    np.testing.assert_array_equal(rwkv_jax.load(back)(tokens)[0], model(tokens)[0])
    hf = tmp_path / "hf.safetensors"
    assert main(["convert", str(st), str(hf), "--names", "hf", "-q"]) == 0
    hf_tensors = read_tensors(hf)
    assert "rwkv.blocks.0.attention.time_decay" in hf_tensors
    official = to_official_names(hf_tensors)
    assert sorted(official) == sorted(a)
    for k in a:
        np.testing.assert_array_equal(official[k], a[k])
    capsys.readouterr()
    assert main(["convert", str(st), str(tmp_path / "x.bin"), "-q"]) == 2
    assert "unknown output suffix" in capsys.readouterr().err


def test_prepare_cli(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("hello\n", encoding="utf-8")
    b.write_text('{"text": "caf\u00e9"}\n{"text": "x"}\n', encoding="utf-8")
    assert main(["prepare", str(a), str(b), "--out", str(tmp_path / "tok"),
                 "--tokenizer", "bytes"]) == 0
    assert "12 tokens" in capsys.readouterr().out  # no separator between byte documents
    src = read_prepared(tmp_path / "tok")
    assert bytes(src.tokens.tolist()) == "hello\ncaf\u00e9x".encode()
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t2"),
                 "--tokenizer", "bytes"]) == 2
    assert "missing.txt" in capsys.readouterr().err
