"""Training: config errors, exact resume, crash safety, loss falls, bf16, L2Wrap, non-finite."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax.config import ConfigError
from rwkv_jax.evaluate import cross_entropy
from rwkv_jax.train import optim
from rwkv_jax.train import step as step_mod
from rwkv_jax.train.config import load_config
from rwkv_jax.train.trainer import Trainer, TrainingDiverged

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _corpus(tmp_path) -> pathlib.Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    path.write_text(" ".join(rng.choice(words, 6000)) + "\n")
    return path


def _cfg(tmp_path, *extra):
    return load_config(None, [
        f"out_dir={tmp_path / 'run'}", f"data.path={_corpus(tmp_path)}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.n_layer=2", "model.n_embd=32", "data.ctx_len=16", "train.batch_size=4",
        "train.max_steps=8", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
        "checkpoint.every=4", "schedule.warmup_steps=2", "logging.progress=false",
        "train.sample_tokens=0", *extra])


def _losses(run_dir) -> list[tuple[int, float]]:
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train_loss"]) for r in map(json.loads, lines)]


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key train.max_step; valid keys in train: batch_size"),
    ("train.max_steps=abc", "train.max_steps: expected int"),
    ("optimizer.lr=fast", "optimizer.lr: expected float"),
    ("model.version=9", "model.version"),
    ("model.wkv_impl=warp", "wkv_impl"),
    ("schedule.kind=linearish", "schedule.kind: 'linearish' is not one of"),
    ("bogus=1", "unknown key bogus; valid keys in the top level: checkpoint, data"),
    ("train.max_steps", "not of the form key.sub=value"),
    ("model.n_layer=-2", "n_layer: must be a positive integer"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown key train.batch_sise"):
        load_config(bad)


def test_shipped_configs_parse():
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        assert cfg.train.max_steps > 0
    sh = load_config(ROOT / "configs" / "shakespeare-char.yaml")
    assert (sh.data.ctx_len, sh.train.batch_size, sh.train.max_steps) == (64, 12, 2000)


def test_cli_config_error_before_work(tmp_path):
    from rwkv_jax.cli import main
    assert main(["train", f"out_dir={tmp_path / 'x'}", "train.nope=1"]) == 2
    assert not (tmp_path / "x").exists()


# ---- optimizer pieces ---------------------------------------------------------------------
def test_param_groups_rwkv4():
    assert optim.lr_multiplier("blocks.0.att.time_decay", "4") == 2.0
    assert optim.lr_multiplier("blocks.0.att.time_first", "4") == 3.0
    assert optim.lr_multiplier("blocks.0.att.time_mix_k", "4") == 1.0
    assert optim.lr_multiplier("blocks.0.att.time_decay", "4", layerwise_lr=False) == 1.0
    assert optim.decays("blocks.0.att.key.weight", 2) and optim.decays("emb.weight", 2)
    assert not optim.decays("blocks.0.att.time_mix_k", 3)
    assert not optim.decays("blocks.0.ln1.weight", 1)


@pytest.mark.parametrize("version, leaf, scale", [("4", "time_decay", 2.0),
                                                  ("4", "time_first", 3.0),
                                                  ("7", "w0", 2.0)])
def test_param_groups_reach_the_real_optimizer(version, leaf, scale):
    """The optimizer built from a model's own parameter tree scales the official groups and
    decays only the matrices (names come from the tree, so a naming slip shows here)."""
    from flax import nnx

    from rwkv_jax.model.functional import tree_names
    from rwkv_jax.train.config import OptimizerConfig
    model = rwkv_jax.RWKV(rwkv_jax.RWKVConfig.tiny(version), rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    names = tree_names(params)
    tx = optim.make_optimizer(params, names, version,
                              OptimizerConfig(weight_decay=0.5, grad_clip=0.0))
    ones = jax.tree.map(jnp.ones_like, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    # unit gradients, zero weights: adam's first update is 1 everywhere, times the group scale
    upd, _ = tx.update(ones, tx.init(params), zeros)
    flat = dict(zip(jax.tree.leaves(names), jax.tree.leaves(upd)))
    assert float(flat[f"blocks.0.att.{leaf}"].reshape(-1)[0]) == pytest.approx(scale, rel=1e-3)
    assert float(flat["blocks.0.ln1.weight"].reshape(-1)[0]) == pytest.approx(1.0, rel=1e-3)
    # zero gradients, unit weights: only weight decay moves the parameter, matrices only
    upd, _ = tx.update(zeros, tx.init(params), ones)
    flat = dict(zip(jax.tree.leaves(names), jax.tree.leaves(upd)))
    assert float(flat["blocks.0.att.key.weight"].reshape(-1)[0]) == pytest.approx(0.5)
    assert float(flat["blocks.0.ln1.weight"].reshape(-1)[0]) == 0.0


def test_schedule_matches_rwkv_lm():
    from rwkv_jax.train.config import OptimizerConfig, ScheduleConfig
    opt = OptimizerConfig(lr=6e-4, lr_final=1e-5)
    exp = optim.schedule(opt, ScheduleConfig(kind="exponential", warmup_steps=10), 101)
    assert float(exp(0)) == pytest.approx(6e-4 * 0.2)
    assert float(exp(5)) == pytest.approx(6e-4 * np.exp(np.log(1e-5 / 6e-4) * 0.05)
                                          * (0.2 + 0.8 * 0.5))
    assert float(exp(100)) == pytest.approx(1e-5)
    cos = optim.schedule(opt, ScheduleConfig(kind="cosine", warmup_steps=0), 101)
    f = 1e-5 / 6e-4
    assert float(cos(50)) == pytest.approx(6e-4 * ((0.5 + f / 2) + (0.5 - f / 2) * np.cos(np.pi / 2)))
    assert float(cos(100)) == pytest.approx(1e-5)


def test_l2wrap_gradient_matches_rwkv_lm_definition():
    """d/dlogits of l2wrap(loss, logits) = dloss/dlogits + g·max·1e-4/(B·T) at each argmax."""
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (2, 3, 11), jnp.float32) * 3
    targets = jnp.asarray([[1, 2, 3], [4, 5, 6]])

    def plain(lg):
        return cross_entropy(lg, targets)

    def wrapped(lg, scale):
        return scale * optim.l2wrap(cross_entropy(lg, targets), lg)

    for scale in (1.0, 0.25):  # grad_output != 1 must scale the extra term (the fixed form)
        g = np.asarray(jax.grad(wrapped)(logits, scale))
        want = scale * np.asarray(jax.grad(plain)(logits))
        lg = np.asarray(logits)
        idx = lg.argmax(-1)
        for b in range(2):
            for t in range(3):
                want[b, t, idx[b, t]] += scale * lg[b, t, idx[b, t]] * 1e-4 / 6
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)
    assert float(wrapped(logits, 1.0)) == pytest.approx(float(plain(logits)))


# ---- the loop ------------------------------------------------------------------------------
def test_loss_falls_and_export_loads(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=60", "optimizer.lr=1e-2", "train.log_every=1",
               "data.tokenizer=char",
               "train.eval_every=60", "checkpoint.every=60")
    metrics = Trainer(cfg).fit()
    losses = _losses(cfg.out_dir)
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    assert metrics["val_loss"] < 2.6  # from ln(vocab) ≈ 3.3 for this ~25-char corpus
    for key in ("step", "train_loss", "lr", "tokens_per_s", "grad_norm"):
        assert key in json.loads((pathlib.Path(cfg.out_dir) / "metrics.jsonl").read_text()
                                 .splitlines()[0])
    model = rwkv_jax.load(cfg.out_dir)
    assert model.config.vocab_size < 40  # char vocab from the data, not the default 256
    assert (pathlib.Path(cfg.out_dir) / "config.yaml").exists()


def test_final_evaluation_scores_final_eval_batches(tmp_path):
    """Progress evaluations score train.eval_batches batches, the final step's
    train.final_eval_batches: each logged val_loss is the mean over exactly those windows."""
    from rwkv_jax.data import eval_batches
    from rwkv_jax.evaluate import score_windows
    cfg = _cfg(tmp_path, "train.eval_batches=1", "train.final_eval_batches=5")
    t = Trainer(cfg)
    t.fit()
    recs = [json.loads(line) for line in
            (pathlib.Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert sorted(vals) == [4, 8]

    def score(n):
        return score_windows(t.model(), eval_batches(t.batches.val, batch_size=4, ctx_len=16,
                                                     max_batches=n),
                             state_policy="reset").loss

    final, one, five = vals[8], score(1), score(5)
    assert abs(one - five) > 1e-4  # the two window sets really differ
    assert final == pytest.approx(five, rel=1e-6)
    assert final != pytest.approx(one, rel=1e-6)
    with pytest.raises(ConfigError, match="train.final_eval_batches"):
        _cfg(tmp_path, "train.final_eval_batches=0")


def test_resume_is_exact(tmp_path):
    straight = _cfg(tmp_path / "a")
    Trainer(straight).fit()
    resumed_cfg = _cfg(tmp_path / "b")
    Trainer(resumed_cfg).fit(stop_at=4)  # interrupted after the step-4 checkpoint
    t = Trainer(resumed_cfg)  # a new process would do the same: resume from step 4
    t.fit()
    a, b = _losses(straight.out_dir), _losses(resumed_cfg.out_dir)
    assert [s for s, _ in b] == list(range(1, 9))
    assert a == b  # bit-identical losses


def _train_in_subprocess(cfg, kill_at_save: int | None = None, env_extra: dict | None = None):
    """Run ``Trainer(cfg).fit()`` in a fresh process (production settings: no x64).

    ``kill_at_save``: SIGKILL the process inside the save of that step, after orbax has
    written the checkpoint and before its atomic rename makes it visible.
    """
    script = textwrap.dedent(f"""
        import json, os, signal
        from orbax.checkpoint._src.path import atomicity
        from rwkv_jax.train.config import load_config
        from rwkv_jax.train.trainer import Trainer
        orig = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if self.get_final().name == {str(kill_at_save)!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return await orig(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        Trainer(load_config(None, json.loads({json.dumps(json.dumps(_overrides(cfg)))}))).fit()
    """)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env)


def test_kill9_during_checkpoint_save_loses_nothing(tmp_path):
    """SIGKILL inside the second checkpoint save (after writing, before the atomic rename):
    the rerun resumes from the first checkpoint and ends with the uninterrupted losses."""
    reference = _cfg(tmp_path / "ref")
    assert _train_in_subprocess(reference).returncode == 0
    cfg = _cfg(tmp_path / "crash")
    proc = _train_in_subprocess(cfg, kill_at_save=8)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = pathlib.Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4"]
    assert not (pathlib.Path(cfg.out_dir) / "model.safetensors").exists()
    proc = _train_in_subprocess(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed at step 4" in proc.stderr
    assert _losses(cfg.out_dir) == _losses(reference.out_dir)


def test_data_parallel_on_8_cpu_devices_matches_one_device(tmp_path):
    """mesh.data=4 over forced host devices: the batch is sharded, losses match 1 device."""
    one = _cfg(tmp_path / "one", "train.max_steps=4", "checkpoint.every=4")
    assert _train_in_subprocess(one).returncode == 0
    many = _cfg(tmp_path / "many", "train.max_steps=4", "checkpoint.every=4", "mesh.data=4")
    proc = _train_in_subprocess(
        many, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _losses(one.out_dir), _losses(many.out_dir)
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=2e-5)


# ---- several processes (hosts) -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_train(cfg, tmp_path, n_processes: int = 1, devices_per_process: int = 1,
               timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``python -m rwkv_jax train <cfg>`` as ``n_processes`` local processes joined by
    RWKV_JAX_* (each with ``devices_per_process`` CPU devices); [(returncode, stderr)]."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    for k in ("RWKV_JAX_COORDINATOR", "RWKV_JAX_NUM_PROCESSES", "RWKV_JAX_PROCESS_ID",
              "RWKV_JAX_DISTRIBUTED"):
        env.pop(k, None)
    if n_processes > 1:
        env.update(RWKV_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
                   RWKV_JAX_NUM_PROCESSES=str(n_processes))
    logs = tmp_path / f"logs-{_free_port()}"
    logs.mkdir(parents=True)
    procs = []
    for i in range(n_processes):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rwkv_jax", "train", *_overrides(cfg)], stdout=out,
                stderr=err, env={**env, **({"RWKV_JAX_PROCESS_ID": str(i)} if n_processes > 1
                                           else {})}))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(c, (logs / f"{i}.err").read_text()) for i, c in enumerate(codes)]


def test_distributed_env_settings():
    from rwkv_jax.train.distributed import _settings
    assert _settings({}) is None and _settings({"RWKV_JAX_DISTRIBUTED": "0"}) is None
    assert _settings({"RWKV_JAX_DISTRIBUTED": "auto"}) == {}
    env = {"RWKV_JAX_COORDINATOR": "10.0.0.1:1234", "RWKV_JAX_NUM_PROCESSES": "4",
           "RWKV_JAX_PROCESS_ID": "3"}
    assert _settings(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                              "process_id": 3}
    for bad, message in [
        ({"RWKV_JAX_PROCESS_ID": None}, "RWKV_JAX_PROCESS_ID is not set"),
        ({"RWKV_JAX_COORDINATOR": "host"}, "RWKV_JAX_COORDINATOR: 'host' is not of the form"),
        ({"RWKV_JAX_NUM_PROCESSES": "two"}, "RWKV_JAX_NUM_PROCESSES: expected an integer"),
        ({"RWKV_JAX_PROCESS_ID": "4"}, r"RWKV_JAX_PROCESS_ID: 4 is not in \[0, "),
        ({"RWKV_JAX_DISTRIBUTED": "yes"}, "RWKV_JAX_DISTRIBUTED: 'yes' is not one of"),
    ]:
        e = {k: v for k, v in {**env, **bad}.items() if v is not None}
        with pytest.raises(ConfigError, match=message):
            _settings(e)


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
    """`rwkv-jax train` as 2 local processes x 2 CPU devices (a 4-device mesh over both,
    joined by RWKV_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID): the per-step losses are the
    1-process run's, process 0 alone writes metrics/logs/export, and a rerun after losing the
    last checkpoint resumes in both processes and continues exactly."""
    extra = ("train.max_steps=12", "train.eval_every=6", "checkpoint.every=6")
    one = _cfg(tmp_path / "one", *extra)
    [(code, err)] = _cli_train(one, tmp_path)
    assert code == 0, err[-2000:]
    two = _cfg(tmp_path / "two", *extra)
    results = _cli_train(two, tmp_path, n_processes=2, devices_per_process=2)
    assert [c for c, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "2 processes x 2 devices" in results[0][1]
    assert "rwkv-jax train" not in results[1][1]  # process 1 logs nothing
    a, b = _losses(one.out_dir), _losses(two.out_dir)
    assert [s for s, _ in b] == list(range(1, 13))  # one writer: each step once
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=1e-5)
    run = pathlib.Path(two.out_dir)
    assert (run / "config.yaml").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["12", "6"]
    m1, m2 = rwkv_jax.load(one.out_dir), rwkv_jax.load(two.out_dir)
    from rwkv_jax.checkpoint import model_tensors
    t1, t2 = model_tensors(m1), model_tensors(m2)
    assert t1.keys() == t2.keys()
    for k in t1:
        np.testing.assert_allclose(t2[k], t1[k], rtol=1e-3, atol=1e-5, err_msg=k)

    # lose the last checkpoint and the export, as if killed after step 6's save: both
    # processes restore step 6 and the rerun ends with the same metrics
    first = _losses(two.out_dir)
    import shutil
    shutil.rmtree(run / "checkpoints" / "12")
    (run / "model.safetensors").unlink()
    results = _cli_train(two, tmp_path, n_processes=2, devices_per_process=2)
    assert [c for c, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "resumed at step 6" in results[0][1]
    assert _losses(two.out_dir) == first
    assert (run / "model.safetensors").exists()


def _overrides(cfg) -> list[str]:
    d = cfg.to_dict()
    out = []
    for section, values in d.items():
        if isinstance(values, dict):
            out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()
                    if section not in ("model",) or k in ("n_layer", "n_embd")]
        else:
            out.append(f"{section}={values}")
    return out


def test_bf16_compute_trains(tmp_path):
    cfg = _cfg(tmp_path, "model.compute_dtype=bfloat16", "train.max_steps=30",
               "optimizer.lr=1e-2", "train.log_every=10", "train.eval_every=30",
               "checkpoint.every=30")
    Trainer(cfg).fit()
    losses = _losses(cfg.out_dir)
    assert np.isfinite([loss for _, loss in losses]).all()
    assert losses[-1][1] < losses[0][1]
    params = jax.tree.leaves(Trainer(cfg).state.params)
    assert all(p.dtype == jnp.float32 for p in params)  # fp32 master weights


def test_raising_max_steps_continues(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=4")
    Trainer(cfg).fit()
    more = _cfg(tmp_path, "train.max_steps=6")
    t = Trainer(more)
    t.fit()
    assert [s for s, _ in _losses(more.out_dir)] == list(range(1, 7))


def test_grad_accumulation_runs(tmp_path):
    a = _cfg(tmp_path / "a", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=2")
    Trainer(a).fit()
    assert np.isfinite([loss for _, loss in _losses(a.out_dir)]).all()


def _poisoned_trainer(cfg, monkeypatch, how: str) -> Trainer:
    """A trainer whose compiled step goes non-finite: an infinite loss, or a finite loss
    whose update (lr = inf) makes the parameters non-finite."""
    if how == "loss":
        monkeypatch.setattr(step_mod, "cross_entropy", lambda *a: jnp.float32(jnp.inf))
    t = Trainer(cfg)
    if how == "update":
        t.spec = dataclasses.replace(t.spec, lr=lambda step: jnp.float32(jnp.inf))
    t.train_step = step_mod.compile_train_step(t.spec, t.state_shardings,
                                               t.topology.batch_sharding(3, 1),
                                               t.topology.replicated)
    t.train_steps = step_mod.compile_train_steps(t.spec, t.state_shardings,
                                                 t.topology.batch_sharding(4, 2),
                                                 t.topology.replicated)
    return t


@pytest.mark.parametrize("how", ["loss", "update"])
def test_nonfinite_step_stops_and_keeps_checkpoint(tmp_path, monkeypatch, how):
    cfg = _cfg(tmp_path, "train.max_steps=8")
    Trainer(cfg).fit(stop_at=4)  # 4 good steps, checkpoint at 4
    with pytest.raises(TrainingDiverged, match="non-finite loss.*step 4.* is intact"):
        _poisoned_trainer(cfg, monkeypatch, how).fit()
    monkeypatch.undo()
    ckpts = pathlib.Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4"]
    t3 = Trainer(cfg)
    assert t3.restore_latest() and t3.step == 4
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(t3.state.params))


def test_steps_per_call_gives_the_same_run(tmp_path):
    """Several steps per dispatch (the default) and one per dispatch train exactly the same
    model: the same logged losses and the same final parameters, bit for bit."""
    common = ("train.max_steps=9", "train.log_every=4", "train.eval_every=0",
              "checkpoint.every=100")
    one = _cfg(tmp_path / "one", *common, "train.steps_per_call=1")
    many = _cfg(tmp_path / "many", *common, "train.steps_per_call=3")
    t_one, t_many = Trainer(one), Trainer(many)
    assert (t_one.steps_per_call, t_many.steps_per_call) == (1, 3)
    t_one.fit()
    t_many.fit()
    assert _losses(one.out_dir) == _losses(many.out_dir)
    assert [s for s, _ in _losses(many.out_dir)] == [4, 8, 9]
    for a, b in zip(jax.tree.leaves(t_one.state.params), jax.tree.leaves(t_many.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(t_many.state.step) == 9


def test_plan_ends_calls_at_hooked_steps_and_the_cap():
    from rwkv_jax.train import loop
    hooks = [loop.Every(5), loop.Every(0, at_end=True)]
    assert loop.plan(0, 12, 12, hooks, 3) == [
        (0, 3, False), (3, 2, True), (5, 3, False), (8, 2, True), (10, 2, True)]
    # a pause before the end: the last call ends at the pause, unsynced unless wanted
    assert loop.plan(2, 7, 12, hooks, 64) == [(2, 3, True), (5, 2, False)]
    assert loop.plan(4, 4, 12, hooks, 8) == []


def test_nonfinite_step_inside_a_call_names_that_step(tmp_path):
    """A step that goes non-finite in the middle of a multi-step call stops the call there:
    the error names that step, not the call's last, and the checkpoint before it is kept."""
    cfg = _cfg(tmp_path, "train.max_steps=12", "train.log_every=12", "train.eval_every=0",
               "checkpoint.every=4")
    t = Trainer(cfg)
    # finite until state.step reaches 6 (the 7th step), then an infinite learning rate
    t.spec = dataclasses.replace(t.spec, lr=lambda step: jnp.where(step >= 6, jnp.inf, 1e-3))
    t.train_steps = step_mod.compile_train_steps(t.spec, t.state_shardings,
                                                 t.topology.batch_sharding(4, 2),
                                                 t.topology.replicated)
    with pytest.raises(TrainingDiverged, match=r"at step 7 .*step 4"):
        t.fit()
    ckpts = pathlib.Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4"]


def test_default_yaml_is_the_builtin_default():
    """configs/default.yaml documents exactly what `rwkv-jax train` runs with no arguments."""
    assert load_config(ROOT / "configs" / "default.yaml") == load_config(None)


def test_bf16_linear_backward_matches_autodiff():
    """The bf16 Linear's custom backward (cotangent cast to bf16, fp32 accumulation) agrees
    with fp32 autodiff to bf16 precision."""
    from rwkv_jax.model.layers import Linear
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((24, 16)).astype(np.float32)) / 4
    x = jnp.asarray(rng.standard_normal((3, 5, 16)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((3, 5, 24)).astype(np.float32))

    def f(x, w, dtype):
        lin = Linear(16, 24, init=w, compute_dtype=dtype)
        return jnp.sum(lin(x).astype(jnp.float32) * g)

    want = jax.grad(f, argnums=(0, 1))(x, w, jnp.float32)
    got = jax.grad(f, argnums=(0, 1))(x, w, jnp.bfloat16)
    for a, b in zip(got, want):
        assert a.dtype == jnp.float32  # fp32 master weights get fp32 gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=3e-2 * float(jnp.abs(b).max()))


def test_parameter_estimate_bounds_the_real_count():
    """The size check's estimate (config.estimated_params) is within 2x of every version's
    real parameter count (the check only has to catch sizes far past the machine)."""
    from flax import nnx

    import rwkv_jax
    from rwkv_jax.train.config import estimated_params
    for version in ("4", "5.1", "5.2", "6", "7"):
        cfg = rwkv_jax.RWKVConfig.tiny(version, n_layer=2)
        model = rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))
        real = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert real / 2 <= estimated_params(cfg) <= 2 * real, (version, real)
