"""Fine-tuning from a checkpoint (finetune.*): step 0 is the checkpoint's own loss, the model
and tokenizer follow the checkpoint, LoRA and state tuning end to end (exports, the
unmerged load, the tuned state in `generate --state-in`), exact resume, chat SFT masks."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import data, lora
from rwkv_jax.checkpoint import model_tensors, read_tensors
from rwkv_jax.config import ConfigError
from rwkv_jax.evaluate import evaluate_tokens, score_windows
from rwkv_jax.train.config import load_config
from rwkv_jax.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAT = ROOT / "configs" / "data" / "pirate-chat.jsonl"
# fixture -> the overrides shapes cannot tell
FIXTURES = {"rwkv4-tiny-660k.pth": [], "rwkv5.1-tiny-730k.pth": ["model.ln_x_eps=1e-5"],
            "rwkv5.2-tiny-730k.pth": ["model.ln_x_eps=1e-5"], "rwkv6-tiny-3m.pth": [],
            "rwkv7-tiny-834k.pth": []}


def _text(tmp_path, shared=None, n_bytes: int = 6000) -> pathlib.Path:
    """A small byte-level text: the start of tinyshakespeare (what the fixtures saw)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "text.txt"
    src = (shared or pathlib.Path("/nonexistent")) / "data" / "tinyshakespeare.txt"
    if src.exists():
        path.write_bytes(src.read_bytes()[:n_bytes])
    else:
        rng = np.random.default_rng(0)
        words = ["the", "king", "shall", "speak", "and", "we", "hear", "him", "now"]
        path.write_text(" ".join(rng.choice(words, n_bytes // 5)) + "\n")
    return path


def _cfg(run, base, method, *extra, data_path):
    return load_config(None, [
        f"out_dir={run}", f"finetune.init_from={base}", f"finetune.method={method}",
        f"data.path={data_path}", f"data.cache_dir={run.parent / 'cache'}",
        "data.ctx_len=16", "train.batch_size=4", "train.max_steps=1", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=2", "checkpoint.every=1000",
        "schedule.warmup_steps=0", "logging.progress=false", "train.sample_tokens=0", *extra])


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(run) / "metrics.jsonl").read_text()
            .splitlines()]


def _val_loss_of(model, cfg):
    """The validation loss of ``model`` as evaluate_tokens computes it, on the windows the
    trainer validates on (same data, split, ctx_len, batch and count)."""
    src = data.open_tokens(cfg.data.path, "bytes", cache_dir=cfg.data.cache_dir)
    val = data.split_source(src, cfg.data.val_fraction, ctx_len=cfg.data.ctx_len).val
    return evaluate_tokens(model, val, ctx_len=cfg.data.ctx_len, state_policy="reset",
                           batch_size=cfg.train.batch_size, max_batches=cfg.train.eval_batches,
                           tokenizer=src.tokenizer)


# ---- starting from a checkpoint -------------------------------------------------------------
@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_step0_is_the_checkpoints_own_loss(tmp_path, fixtures_dir, shared_dir, fixture,
                                           capsys):
    """The step-0 record (metrics.jsonl and stderr) is evaluate_tokens of the fixture itself
    on the same validation windows; the model section and tokenizer came from the file."""
    base = fixtures_dir / fixture
    cfg = _cfg(tmp_path / "run", base, "lora", *FIXTURES[fixture],
               data_path=_text(tmp_path, shared_dir))
    trainer = Trainer(cfg)
    loaded = rwkv_jax.load(base, **({"ln_x_eps": 1e-5} if FIXTURES[fixture] else {}))
    assert trainer.model_cfg == loaded.config
    assert trainer.batches.tokenizer.name == "bytes"  # vocabulary 256
    assert trainer.fit(stop_at=0) == {}  # what precedes the first step: step 0 alone
    step0, = _records(cfg.out_dir)
    assert set(step0) == {"step", "val_loss", "val_bpb"} and step0["step"] == 0
    want = _val_loss_of(loaded, cfg)
    assert step0["val_loss"] == pytest.approx(want.loss, rel=1e-5, abs=1e-5)
    assert step0["val_bpb"] == pytest.approx(want.bits_per_byte, rel=1e-5, abs=1e-5)
    err = capsys.readouterr().err
    assert f"step 0 (the checkpoint as loaded): val_loss {want.loss:.4f}" in err
    assert "trainable of" in err and "(lora)" in err
    # config.yaml records the checkpoint's model, and loads back without contradictions
    dumped = load_config(pathlib.Path(cfg.out_dir) / "config.yaml")
    assert dict(dumped.model_explicit)["n_layer"] == trainer.model_cfg.n_layer


def test_settings_that_contradict_the_checkpoint_are_named(tmp_path, fixtures_dir):
    text = _text(tmp_path)
    v7, v4 = fixtures_dir / "rwkv7-tiny-834k.pth", fixtures_dir / "rwkv4-tiny-660k.pth"
    cases = [
        (v7, ["model.n_embd=128"], r"model\.n_embd=128 contradicts finetune\.init_from .*"
                                   r"n_embd=64"),
        (v7, ["model.version=6"], r"model\.version='6' contradicts"),
        (v4, ["model.ln_x_eps=1e-5"], r"model\.ln_x_eps: RWKV-4 has no such field"),
        (v7, ["model.n_embdd=3"], r"unknown key model\.n_embdd"),
        (v7, ["finetune.lora_targets=[nope]"], r"finetune\.lora_targets: 'nope' matches no "
                                               r"Linear weight"),
        (v7, [r"finetune.train_also=['.*\.time_maa_x']"], r"finetune\.train_also: .* matches no "
                                                          r"parameter of this RWKV-7"),
        (v7, ["data.tokenizer=world"], r"data\.tokenizer: 'world' has 65536 ids.*vocabulary "
                                       r"of 256"),
        (tmp_path / "nothing.pth", [], r"finetune\.init_from: .*nothing\.pth: no such file"),
    ]
    for base, extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(_cfg(tmp_path / "run", base, "lora", *extra, data_path=text))
    # settable fields are taken
    t = Trainer(_cfg(tmp_path / "run", v7, "full", "model.wkv_impl=chunked",
                     "model.chunk_size=8", data_path=text))
    assert (t.model_cfg.wkv_impl, t.model_cfg.chunk_size) == ("chunked", 8)
    with pytest.raises(ConfigError, match=r"finetune\.method: 'lora' fine-tunes a trained model"):
        load_config(None, ["finetune.method=lora"])
    with pytest.raises(ConfigError, match=r"finetune\.method: 'qlora' is not one of"):
        load_config(None, ["finetune.init_from=x", "finetune.method=qlora"])
    with pytest.raises(ConfigError, match=r"finetune\.lora_targets: '\(' is not a valid regex"):
        load_config(None, ["finetune.init_from=x", "finetune.lora_targets=['(']"])


def test_tokenizer_follows_a_run_directory(tmp_path):
    """A run directory's own tokenizer.json is the data's tokenizer unless data.tokenizer is
    set; then its vocabulary must fit the checkpoint's."""
    from flax import nnx

    from rwkv_jax.rundir import RunDir
    from rwkv_jax.tokenizers import CharTokenizer
    text = tmp_path / "t.txt"
    text.write_text("abcab cab abba " * 200)
    tok = CharTokenizer.from_text(text.read_text())
    model = rwkv_jax.RWKV(rwkv_jax.RWKVConfig.tiny("4", vocab_size=tok.vocab_size),
                          rngs=nnx.Rngs(0))
    RunDir(tmp_path / "base").write_model(model, tok)
    t = Trainer(_cfg(tmp_path / "run", tmp_path / "base", "full", data_path=text))
    assert t.batches.tokenizer.to_dict() == tok.to_dict()
    assert t.model_cfg.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match=r"data\.tokenizer: 'bytes' has 256 ids"):
        Trainer(_cfg(tmp_path / "run", tmp_path / "base", "full", "data.tokenizer=bytes",
                     data_path=text))


# ---- LoRA ---------------------------------------------------------------------------------------
def _opt_bytes(opt_state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
               if np.issubdtype(x.dtype, np.floating))


def test_lora_trains_adapters_only_and_exports(tmp_path, fixtures_dir):
    base = fixtures_dir / "rwkv5.2-tiny-730k.pth"
    cfg = _cfg(tmp_path / "run", base, "lora", "model.ln_x_eps=1e-5", "train.max_steps=24",
               "optimizer.lr=2e-2", "finetune.lora_rank=4", "finetune.lora_dropout=0.05",
               "train.eval_every=24", r"finetune.train_also=['blocks\.0\.ln1\.weight']",
               "data.ctx_len=32", data_path=CHAT)  # new to the model: chat, pirate style
    trainer = Trainer(cfg)
    # only the trainable part carries optimizer state: Adam's two moments of the adapters
    trainable = jax.tree.leaves(trainer.state.params)
    adapter_bytes = sum(x.size * x.dtype.itemsize for x in trainable)
    shapes = [lin.weight.shape for lin in lora.adapted(trainer.host_model()).values()]
    assert len(shapes) == 12 * 8  # 12 layers x (att r/k/v/o/gate + ffn k/v/r)
    # float32 A [4, in] and B [out, 4] of each, and the ln1 weight [64] trained in full
    assert adapter_bytes == 4 * (sum(4 * (o + i) for o, i in shapes) + 64)
    assert _opt_bytes(trainer.state.opt_state) == 2 * adapter_bytes
    assert trainer.n_params * 4 == adapter_bytes and trainer.n_params < trainer.n_total // 10
    trainer.fit()
    records = _records(cfg.out_dir)
    assert records[0]["step"] == 0 and records[-1]["step"] == 24
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.2, records

    run = pathlib.Path(cfg.out_dir)
    assert {"model.safetensors", "lora.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in run.iterdir()}
    before, after = read_tensors(base), read_tensors(run)
    assert set(before) == set(after)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    targets = {k for k in before if any(
        re.fullmatch(p, k) for p in rwkv_jax.versions.spec("5.2").lora_targets)}
    assert len(targets) == 12 * 8
    assert changed == targets | {"blocks.0.ln1.weight"}  # everything else bit-identical

    tensors, meta = lora.read(run / "lora.safetensors")
    assert meta["base_sha256"] == lora.file_sha256(base) and meta["rank"] == 4
    k = "blocks.2.att.key"
    a, b = tensors[k + ".lora_A"], tensors[k + ".lora_B"]
    np.testing.assert_allclose(after[k + ".weight"],
                               before[k + ".weight"] + meta["alpha"] / 4 * (b @ a),
                               rtol=1e-6, atol=1e-7)
    merged = rwkv_jax.load(run)
    assert merged.config.ln_x_eps == 1e-5  # config.json keeps what shapes cannot tell
    unmerged = rwkv_jax.load(base, lora=run / "lora.safetensors", ln_x_eps=1e-5)
    x = np.asarray([list(b"ROMEO: What say you, my lord?!!!")], np.int32)  # 32: one chunk
    lm, _ = merged(x)
    lu, _ = unmerged(x)
    # W + s·BA rounded once (merged) against x·W + s·(x·B)·A: float32 rounding, relative to
    # logits of magnitude ~5 (seen 1.1e-5 absolute on a Xeon with AVX-512)
    np.testing.assert_allclose(np.asarray(lu), np.asarray(lm), rtol=1e-5, atol=1e-5)
    lb, _ = rwkv_jax.load(base, ln_x_eps=1e-5)(x)
    assert np.abs(np.asarray(lm) - np.asarray(lb)).max() > 1e-2

    # dropout is active in the training loss (keyed), never outside it
    from rwkv_jax.train import step as step_mod
    micro = jax.tree.map(lambda a: a[0], trainer.global_batch(0))
    loss = jax.jit(lambda k: step_mod.loss_fn(trainer.state.params, trainer.state.frozen, micro,
                                              k, spec=trainer.spec))
    la, la2, lb2 = (float(loss(jax.random.key(i))) for i in (0, 0, 1))
    assert la == la2 != lb2


def _resume_matches(tmp_path, make):
    straight = make(tmp_path / "a")
    Trainer(straight).fit()
    resumed = make(tmp_path / "b")
    Trainer(resumed).fit(stop_at=4)
    Trainer(resumed).fit()
    a, b = _records(straight.out_dir), _records(resumed.out_dir)
    assert [r["step"] for r in b] == [0, *range(1, 9)]
    assert [(r["step"], r.get("train_loss")) for r in a] == \
        [(r["step"], r.get("train_loss")) for r in b]


@pytest.mark.parametrize("fixture, method, extra", [
    # RWKV-4 fixture: only layer 0 is non-zero, so its time-mix adapters are the live ones
    ("rwkv4-tiny-660k.pth", "lora", ["finetune.lora_dropout=0.1", "finetune.lora_rank=2",
                                     "optimizer.lr=2e-2"]),
    ("rwkv4-tiny-660k.pth", "state", ["finetune.state_shift=true", "optimizer.lr=0.1"])])
def test_resume_is_exact(tmp_path, fixtures_dir, fixture, method, extra):
    """Interrupted after the step-4 checkpoint and resumed: the same losses (the dropout
    masks come from (seed, step); the frozen base is read again from init_from)."""
    text = _text(tmp_path)
    base = fixtures_dir / fixture
    _resume_matches(tmp_path, lambda run: _cfg(
        run, base, method, "train.max_steps=8", "checkpoint.every=4", *extra, data_path=text))


# ---- state tuning -----------------------------------------------------------------------------
def test_state_tuning_keeps_the_weights_and_the_state_helps(tmp_path, fixtures_dir, capsys):
    from rwkv_jax.cli import main
    from rwkv_jax.generate import generate
    from rwkv_jax.tokenizers import ByteTokenizer
    base = fixtures_dir / "rwkv5.2-tiny-730k.pth"
    cfg = _cfg(tmp_path / "run", base, "state", "model.ln_x_eps=1e-5", "train.max_steps=30",
               "optimizer.lr=0.03", "optimizer.lr_final=0.003", "data.ctx_len=32",
               "train.batch_size=8", "train.eval_every=30", "train.eval_batches=4",
               data_path=CHAT)
    Trainer(cfg).fit()
    run = pathlib.Path(cfg.out_dir)
    records = _records(run)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.01, records
    before, after = read_tensors(base), read_tensors(run)
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)

    model = rwkv_jax.load(base, ln_x_eps=1e-5)
    tuned = rwkv_jax.load_state(run / "state.npz", model)
    assert tuned[3].wkv.shape == (1, 8, 8, 8)
    # the tuned state lowers the loss on the tuning text: the first 8 bytes of windows,
    # each started from it (measured: 3.29 -> ~3.0 nats/byte)
    src = data.open_tokens(CHAT, "bytes", cache_dir=tmp_path / "cache")
    windows = list(data.eval_batches(src, batch_size=8, ctx_len=8, max_batches=16))
    rows = jax.tree.map(lambda a: np.repeat(np.asarray(a), 8, axis=0), tuned)
    empty = score_windows(model, windows, state_policy="reset")
    with_state = score_windows(model, windows, state_policy="reset", state=rows)
    assert with_state.loss < empty.loss - 0.1, (with_state.loss, empty.loss)

    # a 730K model forgets its initial state within a few dozen bytes (the windows above
    # score the first 8): the prompt is short, so the tuned state is still felt
    prompt = "User:"
    args = ["generate", "--model", str(base), "--ln-x-eps", "1e-5", "--prompt", prompt,
            "--temperature", "0", "--max-tokens", "24", "-q"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--state-in", str(run / "state.npz")]) == 0
    stated = capsys.readouterr().out
    ids = np.asarray([list(prompt.encode())], np.int32)
    lp, _ = model(ids, logits_to_keep=1)
    ls, _ = model(ids, tuned, logits_to_keep=1)
    assert float(np.max(np.abs(np.asarray(lp) - np.asarray(ls)))) > 1e-3  # the state is felt
    assert plain == generate(model, ByteTokenizer(), prompt, temperature=0, max_tokens=24)
    assert stated == generate(model, ByteTokenizer(), prompt, state=tuned, temperature=0,
                              max_tokens=24)


def test_state_tuning_rwkv4_starts_from_the_empty_state(fixtures_dir):
    """RWKV-4's trainable (aa, bb, pp) starts at (0, 0, 0): the same outputs as the empty
    state's (0, 0, -1e38), but with gradients for aa and bb."""
    from rwkv_jax.train.methods import State
    model = rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth")
    method = State(model.config)
    start = method.initial_state(method.template(), 2)
    x = np.asarray([list(b"First Citizen:")] * 2, np.int32)
    np.testing.assert_allclose(np.asarray(model(x, start)[0]), np.asarray(model(x)[0]),
                               atol=1e-5)

    def loss(t):
        logits, _ = model.forward(x, method.initial_state(t, 2))
        return logits[:, -1, 0].sum()

    g = jax.grad(loss)(method.template())
    assert np.abs(np.asarray(g["blocks"]["1"]["att"]["time_state"]["aa"])).max() > 0


# ---- chat SFT -----------------------------------------------------------------------------------
def test_sft_chat_masks_prompts(tmp_path, fixtures_dir):
    cfg = _cfg(tmp_path / "run", fixtures_dir / "rwkv5.2-tiny-730k.pth", "lora",
               "model.ln_x_eps=1e-5", "data.loss_on=response", "data.ctx_len=64",
               data_path=CHAT)
    t = Trainer(cfg)
    b = t.batches.train_batch(0)
    mask, y = np.asarray(b.mask), np.asarray(b.y)
    assert 0.2 < mask.mean() < 0.8
    targets = bytes(y[mask > 0].tolist())  # only the replies' bytes are targets
    assert b"matey" in targets and b"User" not in targets and b"Assistant" not in targets
    val = t.evaluate()  # validation is scored on the replies only
    full = Trainer(_cfg(tmp_path / "run2", fixtures_dir / "rwkv5.2-tiny-730k.pth", "lora",
                        "model.ln_x_eps=1e-5", "data.loss_on=all", "data.ctx_len=64",
                        data_path=CHAT)).evaluate()
    assert val["val_loss"] != full["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune-lora", "finetune-state", "sft-chat"])
def test_shipped_finetune_configs_run(tmp_path, fixtures_dir, shared_dir, name,
                                      monkeypatch):
    monkeypatch.chdir(ROOT)  # their paths are relative to the repository, as the README says
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [
        f"out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=2",
        "checkpoint.every=2", f"data.cache_dir={tmp_path / 'cache'}",
        f"finetune.init_from={fixtures_dir / pathlib.Path(load_config(ROOT / 'configs' / f'{name}.yaml').finetune.init_from).name}"])
    metrics = Trainer(cfg).fit()
    assert np.isfinite(metrics["val_loss"])
    assert (pathlib.Path(cfg.out_dir) / ("state.npz" if "state" in name
                                         else "lora.safetensors")).exists()
