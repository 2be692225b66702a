"""The run directory as one owner knows it: what training writes is what ``load``,
``generate``, ``eval``, ``data.tokenizer=`` and ``rwkv_jax.load_tokenizer`` read, and the
trainer's validation equals ``rwkv-jax eval`` on the same windows and state policy."""

from __future__ import annotations

import json
import pathlib

import pytest

import rwkv_jax
from rwkv_jax.cli import main
from rwkv_jax.train.config import load_config
from rwkv_jax.train.trainer import Trainer

TEXT = ("to be or not to be, that is the question; whether 'tis nobler in the mind to "
        "suffer the slings and arrows of outrageous fortune. ") * 40


def _cfg(tmp_path, out, *extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return load_config(None, [
        f"out_dir={out}", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.tokenizer=char", "model.n_layer=2", "model.n_embd=32", "data.ctx_len=16",
        "train.batch_size=4", "train.max_steps=6", "train.log_every=3", "train.eval_every=6",
        "train.eval_batches=3", "checkpoint.every=6", "logging.progress=false",
        "train.sample_tokens=0", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rundir")
    cfg = _cfg(tmp, tmp / "run")
    metrics = Trainer(cfg).fit()
    return tmp, cfg, metrics


def test_layout_and_tokenizer_everywhere(run, capsys):
    tmp, cfg, _ = run
    out = rwkv_jax.RunDir(cfg.out_dir)
    for name in (out.MODEL, out.CONFIG, out.TOKENIZER, out.RUN_CONFIG, out.METRICS):
        assert (out / name).is_file(), name
    tok = rwkv_jax.load_tokenizer(cfg.out_dir)
    assert tok.name == "char" and tok.vocab_size < 40
    model = rwkv_jax.load(cfg.out_dir)
    assert rwkv_jax.load_tokenizer(model).to_dict() == tok.to_dict()
    # generate picks the run's own char tokenizer (a byte tokenizer would not fit V < 40)
    assert main(["generate", "--model", str(cfg.out_dir), "--prompt", "to be", "-q",
                 "--max-tokens", "5", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text == rwkv_jax.generate(model, tok, "to be", max_tokens=5, temperature=0)
    # and training on new data with data.tokenizer = the run's tokenizer.json (and = the dir)
    for spec in (out / out.TOKENIZER, out.path):
        again = _cfg(tmp, tmp / f"again-{pathlib.Path(spec).name}", f"data.tokenizer={spec}",
                     "train.max_steps=1", "checkpoint.every=1", "train.eval_every=0")
        t = Trainer(again)
        assert t.batches.tokenizer.to_dict() == tok.to_dict()


def test_trainer_val_loss_equals_cli_eval(run, tmp_path, capsys):
    """Same windows (the validation split, ctx_len, batch, number of batches), same state
    policy (each window from the empty state): the same loss and bits per byte."""
    tmp, cfg, metrics = run
    tok = rwkv_jax.load_tokenizer(cfg.out_dir)
    ids = tok.encode(TEXT)
    n_train = int(len(ids) * (1 - cfg.data.val_fraction))
    val = tmp_path / "val.txt"
    val.write_text(tok.decode(ids[n_train:]))
    assert tok.encode(val.read_text()) == ids[n_train:]
    assert main(["eval", "--model", str(cfg.out_dir), "--data", str(val), "--json", "-q",
                 "--state", "reset", "--ctx-len", str(cfg.data.ctx_len),
                 "--batch-size", str(cfg.train.batch_size),
                 "--max-batches", str(cfg.train.eval_batches)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["state"] == "reset"
    assert got["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(metrics["val_bpb"], rel=1e-5)
    last = json.loads((pathlib.Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_loss"] == pytest.approx(got["loss"], rel=1e-5)
    # the default policy carries the state, and says so
    assert main(["eval", "--model", str(cfg.out_dir), "--data", str(val), "-q"]) == 0
    assert "state carried across windows" in capsys.readouterr().out


def test_info_verify(run, tmp_path, capsys):
    _, cfg, _ = run
    assert main(["info", "--verify", str(cfg.out_dir)]) == 0
    assert "verified" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["convert", str(cfg.out_dir), str(bad), "-q"]) == 0
    capsys.readouterr()
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-8:-4] = b"\xff\xff\xff\x7f"  # a NaN in the last tensor
    (bad / "model.safetensors").write_bytes(bytes(raw))
    assert main(["info", "--verify", str(bad)]) == 1
    assert "NaN/inf" in capsys.readouterr().out
