"""Training under faults: corrupt and diverged checkpoints, torn metrics, two trainers on one
directory, changed data or vocabulary, failing saves, and kill -9 at random points.

Each test checks the error (type, and that the message names the problem) and that nothing
is lost: the checkpoints left behind resume, and the resumed losses are the ones an
uninterrupted run logs.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.rundir import RunDir, RunDirBusy
from rwkv_jax.train import hooks
from rwkv_jax.train import step as step_mod
from rwkv_jax.train.checkpoints import (
    CheckpointCorrupt,
    Checkpointer,
    CheckpointSaveError,
    digest,
)
from rwkv_jax.train.config import load_config
from rwkv_jax.train.state import TrainState
from rwkv_jax.train.trainer import ResumeError, Trainer, TrainingDiverged

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]


def _corpus(tmp_path: pathlib.Path, words=WORDS, seed: int = 0) -> pathlib.Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(np.random.default_rng(seed).choice(words, 6000)) + "\n")
    return path


def _overrides(tmp_path: pathlib.Path, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _corpus(tmp_path)
    return [f"out_dir={tmp_path / 'run'}", f"data.path={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=2", "model.n_embd=32",
            "data.ctx_len=16", "train.batch_size=4", "train.max_steps=12", "train.log_every=1",
            "train.eval_every=0", "train.eval_batches=2", "checkpoint.every=4",
            "schedule.warmup_steps=2", "logging.progress=false", "train.sample_tokens=0",
            *extra]


def _cfg(tmp_path, *extra):
    return load_config(None, _overrides(tmp_path, *extra))


def _losses(cfg) -> dict[int, float]:
    """step -> train loss from metrics.jsonl; each step must appear once."""
    lines = (pathlib.Path(cfg.out_dir) / RunDir.METRICS).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["train_loss"] for r in records}


def _steps(cfg) -> list[int]:
    d = pathlib.Path(cfg.out_dir) / RunDir.CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _flip(step_dir: pathlib.Path, where: str = "middle", n: int = 256) -> pathlib.Path:
    """Invert ``n`` bytes of the largest array data file of an orbax checkpoint."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    f = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    start = len(data) // 2 if where == "middle" else 0
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


# ---- the digest and the checkpointer (no training) -------------------------------------------
def _state(seed: int = 0, scale: float = 1.0) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32) * scale,
              "b": jnp.asarray(rng.standard_normal(7), jnp.bfloat16)}
    opt = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.asarray(3, jnp.int32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=opt,
                      rng=jnp.zeros(2, jnp.uint32))


def test_digest_sees_every_single_word_change_and_is_deterministic():
    tree = {"f32": jnp.arange(1000, dtype=jnp.float32).reshape(10, 100) / 7,
            "bf16": jnp.arange(10, dtype=jnp.bfloat16), "i8": jnp.arange(5, dtype=jnp.int8),
            "f64": jnp.arange(3, dtype=jnp.float64), "flag": jnp.asarray([True, False]),
            "scalar": jnp.asarray(2.5, jnp.float32)}
    base, finite = digest(tree)
    assert finite and digest(tree)[0] == base
    assert base["['f32']"]["shape"] == [10, 100] and base["['bf16']"]["dtype"] == "bfloat16"
    # one flipped bit anywhere in any array changes that array's digest, and only that one
    for key, idx in [("f32", (3, 41)), ("f32", (9, 99)), ("bf16", (0,)), ("i8", (4,)),
                     ("f64", (2,)), ("flag", (1,)), ("scalar", ())]:
        x = np.array(tree[key])
        if x.dtype == bool:
            x[idx] = ~x[idx]
        else:
            raw = x.view(f"u{x.dtype.itemsize}")
            raw[idx] ^= 1
        got, _ = digest({**tree, key: jnp.asarray(x)})
        changed = [k for k in base if got[k]["sum"] != base[k]["sum"]]
        assert changed == [f"['{key}']"], (key, changed)
    # swapping two elements (same bytes, other places) is seen too
    x = np.array(tree["f32"])
    x[0, 0], x[0, 1] = x[0, 1], x[0, 0]
    assert digest({**tree, "f32": jnp.asarray(x)})[0]["['f32']"] != base["['f32']"]
    assert not digest({**tree, "f32": tree["f32"].at[0, 0].set(jnp.nan)})[1]


def test_checkpoint_verifies_and_refuses_corruption(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    good = _state(0)
    ck.save(1, good, {"note": 1})
    ck.save(2, _state(1), {"note": 2})
    restored = ck.restore(1, _state(5))
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(good.params["w"]))
    assert int(restored.step) == 1 and ck.verified_step() == 1
    # 256 bytes flipped inside the array data: read back silently by orbax, caught here
    _flip(tmp_path / "ck" / "2", "middle")
    with pytest.raises(CheckpointCorrupt, match=r"ck/2: \d+ of \d+ arrays do not match their "
                                                r"recorded checksums"):
        ck.restore(2, _state(5))
    # the file's header damaged: orbax cannot read it; the same error type, naming the step
    ck.save(3, _state(2), {})
    _flip(tmp_path / "ck" / "3", "start")
    with pytest.raises(CheckpointCorrupt, match=r"ck/3: cannot be read"):
        ck.restore(3, _state(5))
    assert ck.verified_step() == 1


def test_save_refuses_a_non_finite_state_and_rotation_keeps_the_last_good(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=1)
    bad = _state(0)
    bad = bad._replace(params={**bad.params, "w": bad.params["w"].at[1, 2].set(jnp.inf)})
    with pytest.raises(CheckpointSaveError, match=r"ck: refusing to save step 1: the state "
                                                  r"holds a non-finite value; no earlier"):
        ck.save(1, bad, {})
    assert ck.steps() == []
    ck.save(1, _state(0), {}, healthy=True)
    ck.save(2, _state(1), {}, healthy=False)
    ck.save(3, _state(2), {}, healthy=False)
    assert ck.steps() == [1, 3]  # keep=1, plus the last healthy one
    ck.save(4, _state(3), {}, healthy=True)
    assert ck.steps() == [4]
    ck.restore(4, _state(9))  # verified: kept until a newer one verifies
    ck.save(5, _state(4), {})
    ck.save(6, _state(5), {})
    assert ck.steps() == [4, 6]
    ck.restore(6, _state(9))
    ck.save(7, _state(6), {})
    assert ck.steps() == [6, 7]


def test_a_failing_save_is_one_error_naming_the_directory(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save(1, _state(0), {})

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as e:
        ck.save(2, _state(1), {})
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'ck'}: cannot save checkpoint step 2 (No space left "
                          "on device); checkpoint step 1 is intact"), msg
    assert "\n" not in msg
    monkeypatch.undo()
    assert Checkpointer(tmp_path / "ck", keep=2).steps() == [1]
    Checkpointer(tmp_path / "ck", keep=2).restore(1, _state(5))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only directories; the injected OSError "
                           "test covers the message")
def test_a_read_only_checkpoint_directory_fails_clearly(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save(1, _state(0), {})
    os.chmod(tmp_path / "ck", 0o555)
    try:
        with pytest.raises(CheckpointSaveError, match=r"cannot save checkpoint step 2 .*; "
                                                      r"checkpoint step 1 is intact"):
            ck.save(2, _state(1), {})
    finally:
        os.chmod(tmp_path / "ck", 0o755)
    Checkpointer(tmp_path / "ck", keep=2).restore(1, _state(5))


# ---- the lock (no training) ------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock() as held:
        assert held.previous is None
        with pytest.raises(RunDirBusy, match=rf"another training run is using this directory: "
                                             rf"process {os.getpid()} on host "
                                             rf"{socket.gethostname()}"):
            run.lock()
    assert not (run / RunDir.LOCK).exists()  # released
    # a holder killed without releasing: same host, process gone -> taken over
    dead = _dead_pid()
    (run / RunDir.LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with run.lock() as held:
        assert held.previous["pid"] == dead
        assert json.loads((run / RunDir.LOCK).read_text())["pid"] == os.getpid()
    # the flock, not the record, is what excludes: a live holder whose record reads as gone
    with run.lock():
        (run / RunDir.LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
        with pytest.raises(RunDirBusy, match=rf"process {dead} on host"):
            run.lock()
    # a holder on another host cannot be checked from here: refused, naming it
    (run / RunDir.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere-42"}))
    with pytest.raises(RunDirBusy, match="process 1 on host elsewhere-42 .*delete the lock"):
        run.lock()


# ---- the metrics file (no training) ----------------------------------------------------------
def test_metrics_file_writes_whole_lines_only_and_drops_a_torn_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    m = hooks.MetricsFile(path, 1, 0)
    m(1, None, {"step": 1, "train_loss": 2.0})
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd, data):  # a full disk: half the line gets written
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError, match="cannot append to the metrics file") as e:
        m(2, None, {"step": 2, "train_loss": 1.5})
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before  # the half line was cut back off
    m.close()
    # a torn last line (power loss mid-write) is dropped with a warning on resume
    path.write_bytes(before + b'{"step": 2, "train_lo')
    warned = []
    m = hooks.MetricsFile(path, 1, 5, warn=warned.append)
    m.close()
    assert path.read_bytes() == before
    assert len(warned) == 1 and "metrics.jsonl:2: incomplete last line" in warned[0]


# ---- training: corrupt, diverged, resume_from ------------------------------------------------
def test_a_corrupt_latest_checkpoint_falls_back_and_the_good_one_survives(tmp_path, capfd):
    """256 bytes flipped inside the latest checkpoint: the resume names it, falls back to the
    previous one (moved aside, not deleted), and continues with the losses it logged."""
    cfg = _cfg(tmp_path)
    Trainer(cfg).fit(stop_at=8)
    first = _losses(cfg)
    assert _steps(cfg) == [4, 8]
    _flip(pathlib.Path(cfg.out_dir) / "checkpoints" / "8")
    capfd.readouterr()
    t = Trainer(cfg)
    t.fit()
    err = capfd.readouterr().err
    # orbax reads a flipped data byte back silently (the checksums catch it) and fails on a
    # flipped header byte: either way the step is named and the resume falls back
    assert re.search(r"warning: \S+/checkpoints/8: (\d+ of \d+ arrays do not match their "
                     r"recorded checksums \(first: .*\)|cannot be read \(.*\)); falling back", err), err
    assert "falling back to the previous checkpoint" in err and "resumed at step 4" in err
    rejected = pathlib.Path(cfg.out_dir) / "checkpoints" / "rejected"
    assert [p.name for p in rejected.iterdir()] == ["8-corrupt"]  # kept for inspection
    after = _losses(cfg)
    assert sorted(after) == list(range(1, 13))
    assert [after[s] for s in range(1, 9)] == [first[s] for s in range(1, 9)]  # exact
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(t.state.params))
    # 4 stays too: the last checkpoint a restore verified is kept until a newer one verifies
    assert _steps(cfg) == [4, 8, 12]
    t = Trainer(cfg)
    assert t.restore_latest() and t.step == 12  # what is left verifies


def test_divergence_names_the_last_healthy_checkpoint_and_resume_from(tmp_path, capfd):
    """optimizer.lr=1000: step 2 is saved with a huge finite loss, step 3 is not finite. The
    message says no checkpoint is from before the divergence; a sane rerun refuses to resume
    the diverged one by default; resume_from=0 starts over, resume_from=2 takes it anyway."""
    cfg = _cfg(tmp_path, "optimizer.lr=1000", "checkpoint.every=2", "train.max_steps=6")
    with pytest.raises(TrainingDiverged) as e:
        Trainer(cfg).fit()
    msg = str(e.value)
    assert "non-finite loss or gradient at step 3" in msg
    assert "No checkpoint in" in msg and "is from before the divergence" in msg
    assert "step 2 was saved after the loss diverged (train loss" in msg
    assert "train.resume_from=0" in msg and "intact" not in msg
    assert _steps(cfg) == [2]
    assert not (pathlib.Path(cfg.out_dir) / RunDir.LOCK).exists()  # released on the error
    sane = _cfg(tmp_path, "checkpoint.every=2", "train.max_steps=6")
    with pytest.raises(ResumeError, match=r"no checkpoint in .* can be resumed from \(step 2 was "
                                          r"saved after the loss diverged .*train.resume_from=0"
                                          r".*train.resume_from=2"):
        Trainer(sane).fit()
    assert _steps(cfg) == [2]  # nothing moved or lost by the refusal
    t = Trainer(_cfg(tmp_path, "checkpoint.every=2", "train.max_steps=6",
                     "train.resume_from=2"))
    assert t.restore_latest(2) and t.step == 2  # an explicit choice takes the diverged one
    capfd.readouterr()
    Trainer(_cfg(tmp_path, "checkpoint.every=2", "train.max_steps=4",
                 "train.resume_from=0")).fit(stop_at=4)
    assert "train.resume_from=0: starting over" in capfd.readouterr().err
    assert sorted(_losses(cfg)) == [1, 2, 3, 4] and _steps(cfg) == [2, 4]
    run_cfg = (pathlib.Path(cfg.out_dir) / RunDir.RUN_CONFIG).read_text()
    assert "resume_from: null" in run_cfg  # a one-off: a rerun of config.yaml won't repeat it


def test_diverged_checkpoints_are_skipped_and_the_healthy_one_is_kept(tmp_path, monkeypatch,
                                                                      capfd):
    """Steps 5-8 trained with a divergence threshold every loss exceeds: checkpoint 8 is
    'diverged'. A non-finite step after it names step 4 (healthy) as what a rerun resumes
    from; the rerun skips 8 and reproduces the losses from step 4 on."""
    cfg = _cfg(tmp_path, "checkpoint.keep=1")
    Trainer(cfg).fit(stop_at=4)
    Trainer(_cfg(tmp_path, "checkpoint.keep=1", "train.divergence_threshold=0.5")).fit(stop_at=8)
    first = _losses(cfg)
    assert _steps(cfg) == [4, 8]  # keep=1, and 4 is the last healthy one: not rotated away
    monkeypatch.setattr(step_mod, "cross_entropy", lambda *a: jnp.float32(jnp.inf))
    with pytest.raises(TrainingDiverged, match=r"at step 9 .*The last healthy checkpoint, step 4 "
                                               r"in .* is intact; step 8 was saved after the loss "
                                               r"diverged \(train loss [\d.]+ > threshold 0.5\)"):
        Trainer(_cfg(tmp_path, "checkpoint.keep=1", "train.resume_from=8")).fit()
    monkeypatch.undo()
    capfd.readouterr()
    Trainer(cfg).fit()
    err = capfd.readouterr().err
    assert "checkpoint step 8 was saved after the loss diverged" in err
    assert "resumed at step 4" in err
    after = _losses(cfg)
    assert sorted(after) == list(range(1, 13))
    assert [after[s] for s in range(1, 9)] == [first[s] for s in range(1, 9)]
    assert (pathlib.Path(cfg.out_dir) / "checkpoints" / "rejected" / "8-diverged").is_dir()


# ---- training: torn metrics, changed data or vocabulary, failing save ------------------------
def test_a_torn_metrics_line_does_not_block_the_resume(tmp_path, capfd):
    cfg = _cfg(tmp_path, "train.max_steps=8")
    Trainer(cfg).fit(stop_at=6)
    path = pathlib.Path(cfg.out_dir) / RunDir.METRICS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a full disk cut the last line mid-way
    first = {s: v for s, v in _losses_prefix(data).items() if s <= 4}
    capfd.readouterr()
    Trainer(cfg).fit()
    err = capfd.readouterr().err
    assert "metrics.jsonl:6: incomplete last line" in err and "dropped" in err
    after = _losses(cfg)
    assert sorted(after) == list(range(1, 9))
    assert [after[s] for s in first] == list(first.values())


def _losses_prefix(data: bytes) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in map(json.loads, data.decode().splitlines())}


def test_changed_data_or_vocabulary_is_refused_in_one_line(tmp_path):
    cfg = _cfg(tmp_path, "data.tokenizer=char", "train.max_steps=6")
    Trainer(cfg).fit(stop_at=4)
    run = pathlib.Path(cfg.out_dir)
    recorded = json.loads((run / RunDir.DATA).read_text())
    assert recorded["n_tokens"] > 0 and recorded["tokenizer"]["type"] == "char"
    corpus = pathlib.Path(cfg.data.path)
    original = corpus.read_text()
    # new characters: the char vocabulary grows (was an orbax shape-mismatch traceback)
    corpus.write_text(original + "QUIZ XYZ!\n")
    with pytest.raises(ResumeError) as e:
        Trainer(cfg).fit()
    msg = str(e.value)
    assert msg.startswith("the vocabulary changed: checkpoint step 4 in ") and "\n" not in msg
    old, new = map(int, re.search(r"has (\d+) tokens, this run's tokenizer \('char'\) has "
                                  r"(\d+) \(a char vocabulary is built from the text", msg).groups())
    assert new == old + 7, msg  # Q U I Z X Y !
    # same characters, other text: the fingerprint says what changed
    corpus.write_text(" ".join(np.random.default_rng(1).choice(WORDS, 6000)) + "\n")
    with pytest.raises(ResumeError, match=r"the training data changed since this run started "
                                          r"\(.*head_sha256 .*; recorded in .*data\.json\); "
                                          r"resume with data\.allow_changed=true"):
        Trainer(cfg).fit()
    assert _steps(cfg) == [4] and json.loads((run / RunDir.DATA).read_text()) == recorded
    allowed = _cfg(tmp_path, "data.tokenizer=char", "train.max_steps=6",
                   "data.allow_changed=true")
    Trainer(allowed).fit(stop_at=6)
    assert json.loads((run / RunDir.DATA).read_text()) != recorded  # the new data recorded
    assert sorted(_losses(cfg)) == list(range(1, 7))
    Trainer(cfg).fit(stop_at=6)  # and the next resume compares against it: no refusal


def test_a_failing_checkpoint_save_stops_the_run_and_loses_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    cfg = _cfg(tmp_path, "train.max_steps=8")
    Trainer(cfg).fit(stop_at=4)
    first = _losses(cfg)

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"checkpoints: cannot save checkpoint step 8 "
                                                  r"\(No space left on device\); checkpoint step "
                                                  r"4 is intact"):
        Trainer(cfg).fit()
    monkeypatch.undo()
    assert _steps(cfg) == [4]
    assert not (pathlib.Path(cfg.out_dir) / RunDir.LOCK).exists()
    Trainer(cfg).fit()
    after = _losses(cfg)
    assert sorted(after) == list(range(1, 9))
    assert [after[s] for s in range(1, 5)] == [first[s] for s in range(1, 5)]


# ---- subprocesses: two trainers, kill -9 ------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import json, os, pathlib, signal, sys, threading, time
    mode, arg, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    from rwkv_jax.train import hooks
    if mode == "pause":  # hold the run after step 1 until the file `arg` appears
        orig_write = hooks.MetricsFile.write_line
        def write_line(self, data):
            orig_write(self, data)
            if json.loads(data)["step"] == 1:
                pathlib.Path(arg + ".ready").touch()
                while not pathlib.Path(arg).exists():
                    time.sleep(0.05)
        hooks.MetricsFile.write_line = write_line
    elif mode == "metrics":  # half of step `arg`'s line written, then killed
        orig_write = hooks.MetricsFile.write_line
        def write_line(self, data):
            if json.loads(data)["step"] == int(arg):
                os.write(self.fd, data[: len(data) // 2])
                die()
            orig_write(self, data)
        hooks.MetricsFile.write_line = write_line
    elif mode == "save":  # inside the save of step `arg`: written, not yet renamed into place
        from orbax.checkpoint._src.path import atomicity
        orig = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if self.get_final().name == arg:
                die()
            return await orig(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif mode == "rotate":  # saved, and killed while rotating the old ones away
        import orbax.checkpoint as ocp
        def delete(self, step):
            die()
        ocp.CheckpointManager.delete = delete
    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.trainer import Trainer
    t = Trainer(load_config(None, overrides))
    if mode == "timer":
        threading.Timer(float(arg), die).start()
    t.fit()
""")


def _spawn(overrides: list[str], mode: str = "none", arg: str = "") -> subprocess.Popen:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, arg, json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(overrides, mode="none", arg="", timeout=600) -> tuple[int, str]:
    p = _spawn(overrides, mode, arg)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def test_two_trainers_on_one_directory(tmp_path):
    """While one trainer runs, a second on the same out_dir is refused with one line naming
    the holder; the first ends with the losses of a run that was alone."""
    solo = _overrides(tmp_path / "solo", "train.max_steps=4")
    code, err = _run(solo)
    assert code == 0, err[-2000:]
    shared = _overrides(tmp_path / "shared", "train.max_steps=4")
    go = tmp_path / "go"
    first = _spawn(shared, "pause", str(go))
    try:
        deadline = time.time() + 600
        while not pathlib.Path(f"{go}.ready").exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        lock = json.loads((tmp_path / "shared" / "run" / RunDir.LOCK).read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        from rwkv_jax.cli import main
        with pytest.raises(RunDirBusy, match=rf"process {first.pid} on host "):
            Trainer(load_config(None, shared)).fit()
        assert main(["train", *shared]) == 2  # the CLI: one line, exit status 2
    finally:
        go.touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert _losses(load_config(None, shared)) == _losses(load_config(None, solo))
    assert not (tmp_path / "shared" / "run" / RunDir.LOCK).exists()


@pytest.mark.slow
def test_kill9_at_random_points_ten_times_then_resume_exactly(tmp_path):
    """Ten SIGKILLs: mid-save (before the atomic rename), mid-metrics-line, mid-rotation and
    at random times; each rerun takes over the stale lock and resumes; the final losses are
    bit-identical to an uninterrupted run's, each step logged once."""
    extra = ("train.max_steps=24", "checkpoint.every=2", "checkpoint.keep=1")
    ref = _overrides(tmp_path / "ref", *extra)
    code, err = _run(ref)
    assert code == 0, err[-2000:]
    runs = _overrides(tmp_path / "crash", *extra)
    cfg = load_config(None, runs)
    rng = random.Random(0)
    kinds = ["save", "metrics", "rotate", "timer"] * 3
    rng.shuffle(kinds)
    kills = 0
    for kind in kinds:
        if kills == 10:
            break
        done = max(_steps(cfg)) if (pathlib.Path(cfg.out_dir) / "checkpoints").exists() and \
            _steps(cfg) else 0
        if done >= 20:
            break
        arg = {"save": str(done + 2 * rng.randint(1, 2)),
               "metrics": str(done + rng.randint(1, 3)),
               "rotate": "", "timer": f"{rng.uniform(0.5, 4.0):.2f}"}[kind]
        code, err = _run(runs, kind, arg)
        assert code in ((-9, 0) if kind == "timer" else (-9,)), (kind, arg, err[-2000:])
        kills += code == -9
    assert kills >= 8
    code, err = _run(runs)
    assert code == 0, err[-2000:]
    assert _losses(cfg) == _losses(load_config(None, ref))
    assert (pathlib.Path(cfg.out_dir) / RunDir.MODEL).exists()
    assert not (pathlib.Path(cfg.out_dir) / RunDir.LOCK).exists()
