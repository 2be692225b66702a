"""Every RWKV version trains through a config, exports, reloads and generates."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import rwkv_jax
from rwkv_jax.generate import generate
from rwkv_jax.tokenizers import ByteTokenizer
from rwkv_jax.train.config import load_config
from rwkv_jax.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


# small LoRA ranks, for the versions that have them
LORA = {"5.1": [], "5.2": [], "6": ["model.d_mix=8", "model.d_decay=8"],
        "7": ["model.d_decay=8", "model.d_aaa=8", "model.d_mv=8", "model.d_gate=8"]}


@pytest.mark.parametrize("version", ["5.1", "5.2", "6", "7"])
def test_version_trains_exports_generates(tmp_path, version):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabcabd " * 400)
    cfg = load_config(ROOT / "configs" / "rwkv7-small.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.path={corpus}", f"data.cache_dir={tmp_path}",
        f"model.version={version}", "model.n_layer=2", "model.n_embd=32", "model.head_size=16",
        *LORA[version], "model.wkv_impl=chunked", "model.chunk_size=8", "data.ctx_len=16", "train.batch_size=4",
        "train.max_steps=30", "train.log_every=1", "train.eval_every=30",
        "train.eval_batches=2", "checkpoint.every=30", "schedule.warmup_steps=3",
        "optimizer.lr=1e-2", "logging.progress=false", "train.sample_tokens=0"])
    Trainer(cfg).fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in lines]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1.0, losses
    model = rwkv_jax.load(tmp_path / "run")
    assert model.config.version == version and model.config.head_size == 16
    text = generate(model, ByteTokenizer(), "abc", max_tokens=6, temperature=0)
    assert len(text.encode()) >= 1
