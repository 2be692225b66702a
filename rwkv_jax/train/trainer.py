"""A training run assembled from its parts: data, model, optimizer, mesh, state, hooks.

:class:`Trainer` builds the pieces a run needs and hands them to the loop
(:mod:`rwkv_jax.train.loop`); the step is the free function of :mod:`rwkv_jax.train.step`,
the mesh and shardings live in :mod:`rwkv_jax.train.mesh`, checkpoints in
:mod:`rwkv_jax.train.checkpoints`, the run directory's layout in :class:`rwkv_jax.RunDir`.

Re-running with the same ``out_dir`` resumes from the latest checkpoint that verifies and
was saved with a healthy loss (``train.resume_from`` picks another); batches depend only on
(seed, step), so the losses continue exactly. One run at a time holds a directory (its lock);
a resume refuses changed data (``data.json``; ``data.allow_changed``), a changed vocabulary
or model, and falls back past corrupt checkpoints (moved to ``checkpoints/rejected/``). Several processes (hosts; see
:mod:`rwkv_jax.train.distributed`) run one job over a mesh of all their devices: each
process samples only its own rows of the (seed, step) batch, so the global batch, and the
losses, are the single-process ones. Every process takes part in each step, evaluation and
checkpoint (``out_dir`` must be on a filesystem all processes share); only process 0
writes logs, metrics, TensorBoard, config.yaml and the exported model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from rwkv_jax.config import ConfigError
from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.model.functional import tree_names
from rwkv_jax.model.lm import RWKV
from rwkv_jax.rundir import RunDir, RunDirBusy, RunLock
from rwkv_jax.train import finetune
from rwkv_jax.train import hooks as hooks_lib
from rwkv_jax.train import loop, optim
from rwkv_jax.train.checkpoints import CheckpointCorrupt, Checkpointer
from rwkv_jax.train.config import RunConfig, dump_config
from rwkv_jax.train.mesh import (
    Topology,
    build_topology,
    bytes_per_device,
    state_shardings,
    total_bytes,
)
from rwkv_jax.train.methods import Full, State
from rwkv_jax.train.state import TrainState
from rwkv_jax.train.step import Batch, StepSpec, compile_train_step, compile_train_steps

# one call of the compiled steps (train.steps_per_call) is given at most this many tokens of
# batches, and about this much work (6 x parameters x tokens: a call of a large model's steps
# is then one step, so Ctrl-C and the logs are never held up by many slow steps)
CALL_TOKENS = 1 << 22
CALL_FLOPS = 1e12


class TrainingDiverged(RuntimeError):
    """The loss or gradient became non-finite; the message names the last healthy
    checkpoint (the one a rerun resumes from)."""


class ResumeError(CheckpointError):
    """The run directory cannot be resumed as configured: its data, vocabulary or model
    changed, or no kept checkpoint verifies; the message says which and what to do."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Batches:
    """Train/validation tokens and the tokenizer, behind the trainer's calls."""

    train: Any           # TokenSource (or a token array)
    val: Any
    tokenizer: Any
    cfg: RunConfig
    source: Any = None   # the TokenSource as opened (before the split): its fingerprint

    @property
    def train_tokens(self):
        return getattr(self.train, "tokens", self.train)

    @property
    def val_tokens(self):
        return getattr(self.val, "tokens", self.val)

    def train_batch(self, step: int, host_index: int = 0, host_count: int = 1) -> Batch:
        """This host's rows of step ``step``'s batch, ``[A, B_host, T]`` (numpy); with
        ``data.pack`` packed documents, ``resets`` set (else None)."""
        from rwkv_jax.data import sample_batch
        t, d = self.cfg.train, self.cfg.data
        xs, ys, masks, resets = [], [], [], []
        for m in range(t.grad_accum):  # each micro-batch is its own (seed, step) draw
            b = sample_batch(self.train, step=step * t.grad_accum + m, batch_size=t.batch_size,
                             ctx_len=d.ctx_len, seed=t.seed, sampler=d.sampler,
                             host_index=host_index, host_count=host_count, pack=d.pack)
            xs.append(b[0])
            ys.append(b[1])
            mask = getattr(b, "mask", None)
            masks.append(np.ones(b[0].shape, np.float32) if mask is None
                         else np.asarray(mask, np.float32))
            if d.pack:
                resets.append(np.asarray(b.resets, np.bool_))
        return Batch(np.stack(xs), np.stack(ys), np.stack(masks),
                     np.stack(resets) if d.pack else None)

    def eval_batches(self, final: bool = False):
        """The validation batches: ``train.eval_batches`` of them, or with ``final``
        ``train.final_eval_batches`` (default: as many)."""
        from rwkv_jax.data import eval_batches
        t = self.cfg.train
        n = t.final_eval_batches if final and t.final_eval_batches is not None \
            else t.eval_batches
        return eval_batches(self.val, batch_size=t.batch_size, ctx_len=self.cfg.data.ctx_len,
                            max_batches=n)

    def sample_prompt(self, n_tokens: int = 24) -> str:
        """The start of the first validation window (what the data looks like)."""
        ids = np.asarray(self.val_tokens[:n_tokens]).tolist()
        return self.tokenizer.decode_bytes(ids).decode("utf-8", errors="ignore")


def build_batches(cfg: RunConfig, tokenizer=None) -> Batches:
    """Open the configured data (default: the stdlib corpus) and split train/validation.
    ``tokenizer``: use this instead of ``data.tokenizer`` (a fine-tune's checkpoint's)."""
    from rwkv_jax import data
    d = cfg.data
    source = data.open_tokens(d.path, tokenizer=d.tokenizer if tokenizer is None else tokenizer,
                              cache_dir=d.cache_dir, max_bytes=d.max_bytes, loss_on=d.loss_on)
    split = data.split_source(source, d.val_fraction, ctx_len=d.ctx_len)
    return Batches(split.train, split.val, source.tokenizer, cfg, source)


def _on_host():
    """A context in which new arrays are made in host memory (the CPU backend's device) when
    the run's devices are accelerators; a no-op where they are CPUs already."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # no CPU backend in this install
        return contextlib.nullcontext()


class Trainer:
    """One training run: its data, model, optimizer, mesh, state and run directory."""

    def __init__(self, cfg: RunConfig, batches: Batches | None = None):
        if cfg.data.pack and cfg.finetune.init_from is not None \
                and cfg.finetune.method == "state":
            raise ConfigError("data.pack: packed documents start from the empty state, which "
                              "would discard the tuned state of finetune.method=state; use "
                              "data.pack=false")
        self.run_dir = RunDir(cfg.out_dir)
        self.out = self.run_dir.path
        # a fine-tune: the model, its config, the method and the tokenizer follow the
        # checkpoint (rwkv_jax.train.finetune)
        self.finetune = finetune.prepare(cfg) if cfg.finetune.init_from is not None else None
        ft = self.finetune
        self.batches = batches or build_batches(cfg, ft.tokenizer if ft else None)
        tok = self.batches.tokenizer
        model_cfg = cfg.model
        if ft is not None:
            ft.check_tokenizer(tok)
            model_cfg = ft.model.config
            cfg = dataclasses.replace(cfg, model=model_cfg)  # config.yaml: the real model
        elif not cfg.vocab_size_explicit:
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        elif model_cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({tok.vocab_size})")
        self.cfg = cfg
        self.model_cfg = model_cfg
        t = cfg.train
        self.topology: Topology = build_topology(cfg.mesh.data, cfg.mesh.fsdp, t.batch_size,
                                                 cfg.mesh.tensor)
        self.primary = self.topology.primary
        if ft is not None:
            model, self.method = ft.model, ft.method
        else:
            with _on_host():  # the full model exists only in host memory; devices get shards
                model = RWKV(model_cfg, rngs=nnx.Rngs(t.seed))
            self.method = Full()
        self.graphdef, params, frozen = self.method.split(model)
        self.n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        # every parameter of the run: the model's (adapters included) and a tuned state
        self.n_total = finetune.parameter_count(nnx.state(model, nnx.Param)) + (
            self.n_params if isinstance(self.method, State) else 0)
        tx = optim.make_optimizer(params, tree_names(params), model_cfg.version, cfg.optimizer)
        self.lr = optim.schedule(cfg.optimizer, cfg.schedule, t.max_steps)
        topo = self.topology

        def create(params, frozen):
            return TrainState.create(params, frozen, tx, t.seed)

        self.state_shardings, self.sharding_notes = state_shardings(
            topo, jax.eval_shape(create, params, frozen), tx, model_cfg.spec.param_axes)
        s = self.state_shardings
        if topo.process_count > 1:  # every process holds the same host values
            params, frozen = jax.device_get((params, frozen))
        params, frozen = jax.device_put((params, frozen), (s.params, s.frozen))
        # the optimizer state is made on the devices, each making only its own shards
        self.state = jax.jit(create, out_shardings=s, donate_argnums=(0, 1))(params, frozen)
        self.host_index, self.host_count = topo.host_rows(t.batch_size)
        self.spec = StepSpec(graphdef=self.graphdef, method=self.method, tx=tx, lr=self.lr,
                             l2wrap=t.l2wrap, chunk_len=t.chunk_len,
                             chunk_grad=t.chunk_grad)
        # one step per call (benchmarks, tests) and several (what fit runs: loop.plan)
        self.train_step = compile_train_step(self.spec, self.state_shardings,
                                             topo.batch_sharding(3, 1), topo.replicated)
        self.train_steps = compile_train_steps(self.spec, self.state_shardings,
                                               topo.batch_sharding(4, 2), topo.replicated)
        self.checkpointer = Checkpointer(self.run_dir / RunDir.CHECKPOINTS, cfg.checkpoint.keep)
        self.step = 0
        self._host_model: tuple[TrainState, RWKV] | None = None

    # ---- pieces the loop is given ------------------------------------------------------------
    @property
    def params(self):
        return self.state.params

    def global_batch(self, step: int) -> Batch:
        """Step ``step``'s batch as global arrays (this process supplies its rows)."""
        local = self.batches.train_batch(step, self.host_index, self.host_count)
        return Batch(*(None if a is None else self.topology.global_batch(a, batch_axis=1)
                       for a in local))

    def global_batches(self, first: int, n: int, k: int) -> Batch:
        """Steps ``first .. first+n-1``'s batches stacked, ``[k, A, B, T]`` global arrays
        (rows past ``n`` are zeros, unread by :func:`~rwkv_jax.train.step.train_steps`)."""
        local = [self.batches.train_batch(first + j, self.host_index, self.host_count)
                 for j in range(n)]

        def stack(parts):
            if parts[0] is None:
                return None
            a = np.stack(parts)
            if n < k:
                a = np.concatenate([a, np.zeros((k - n, *a.shape[1:]), a.dtype)])
            return self.topology.global_batch(a, batch_axis=2)

        return Batch(*(stack(parts) for parts in zip(*local)))

    def run_steps(self, state: TrainState, batches: Batch, n: int):
        """``n`` steps of :meth:`global_batches`' ``batches`` in one call of the compiled
        :func:`~rwkv_jax.train.step.train_steps`: ``(state, metrics)``."""
        return self.train_steps(state, batches, self.topology.put_replicated(np.int32(n)))

    @property
    def steps_per_call(self) -> int:
        """``train.steps_per_call``, capped so that one call's batches hold at most
        :data:`CALL_TOKENS` tokens and its steps about :data:`CALL_FLOPS` of work."""
        t = self.cfg.train
        per_step = t.batch_size * t.grad_accum * self.cfg.data.ctx_len
        flops = 6.0 * max(self.n_total, 1) * per_step
        return max(1, min(t.steps_per_call, CALL_TOKENS // per_step, int(CALL_FLOPS // flops)))

    def model(self, state: TrainState | None = None) -> RWKV:
        """The model of ``state`` (default: the current one), its arrays as the state holds
        them (sharded over this run's mesh)."""
        state = self.state if state is None else state
        return self.method.build(self.graphdef, state.params, state.frozen)

    def host_model(self) -> RWKV:
        """The current parameters as a complete model in this process (gathered from every
        device and process), e.g. to export or to sample from.

        Several processes: a collective (parameters split across processes are all-gathered),
        so every process must call it; :meth:`fit` does, for its export, and a later call
        for the same state returns that model without gathering again (process 0 can then
        sample alone)."""
        if self._host_model is not None and self._host_model[0] is self.state:
            return self._host_model[1]
        model = self.method.build(self.graphdef, *self._host_parts())
        self._host_model = (self.state, model)
        return model

    def _host_parts(self):
        """(trainable, frozen) of the current state, complete in this process (jnp)."""
        from jax.experimental import multihost_utils
        params, frozen = self.state.params, self.state.frozen
        if self.topology.process_count > 1:
            params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
        else:
            params, frozen = jax.device_get((params, frozen))
        to_jnp = lambda t: jax.tree.map(jax.numpy.asarray, t)  # noqa: E731
        return to_jnp(params), to_jnp(frozen)

    def evaluate(self, state: TrainState | None = None, final: bool = False
                 ) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over the configured eval windows,
        each from the empty state (:func:`rwkv_jax.evaluate.score_windows`, policy "reset");
        ``final``: the final step's windows (``train.final_eval_batches``).

        Several processes: every process reads the same windows and feeds its block of rows
        of each batch into the one data-parallel evaluation; the sums come back replicated,
        so every process returns the same numbers (process 0 logs them). State tuning: each
        window starts from the tuned state instead."""
        from rwkv_jax.evaluate import score_windows
        state = self.state if state is None else state
        b = self.cfg.train.batch_size // self.host_count
        rows = slice(self.host_index * b, (self.host_index + 1) * b)

        def put(a):
            return self.topology.global_batch(a[rows], batch_axis=0)

        start = self.method.initial_state(state.params, self.cfg.train.batch_size)
        res = score_windows(self.model(state), self.batches.eval_batches(final),
                            state_policy="reset", tokenizer=self.batches.tokenizer, put=put,
                            state=start)
        return {"val_loss": res.loss, "val_bpb": res.bits_per_byte}

    # ---- checkpoints ---------------------------------------------------------------------------
    def restore_latest(self, resume_from: int | None = None, log=None) -> bool:
        """Restore the checkpoint a rerun continues from; False when there is none (a fresh
        start).

        ``resume_from`` None: the newest checkpoint saved with a healthy loss that verifies
        (:meth:`Checkpointer.restore`); each newer one (corrupt, or saved after the loss
        diverged) is moved to ``checkpoints/rejected/`` with a warning. A step: that kept
        checkpoint, verified (no fallback), newer ones moved aside. 0: start over, every
        checkpoint moved aside. Raises :class:`ResumeError` when nothing can be resumed from
        or the checkpoint does not fit this run's model."""
        log = log or (lambda msg: None)
        ck = self.checkpointer
        steps = ck.steps()
        if resume_from is not None and resume_from < 0:
            raise ConfigError(f"train.resume_from: must be >= 0 (0 starts over), got {resume_from}")
        if resume_from is not None and resume_from != 0 and resume_from not in steps:
            raise ResumeError(f"train.resume_from={resume_from}: {ck.directory} holds no such "
                              f"checkpoint; kept steps: {_steps(steps)}")
        if not steps:
            return False
        if resume_from == 0:
            for s in steps:
                ck.reject(s, "start-over")
            log(f"train.resume_from=0: starting over; checkpoint{'s' * (len(steps) > 1)} "
                f"{_steps(steps)} moved to "
                f"{ck.directory / 'rejected'}")
            return False
        skipped: list[tuple[int, str]] = []
        chosen = None
        for s in ([resume_from] if resume_from is not None else reversed(steps)):
            if resume_from is None and not ck.is_healthy(s):
                skipped.append((s, "diverged"))
                log(f"warning: checkpoint step {s} was saved after the loss diverged "
                    f"({_loss_note(ck.meta(s))}); skipping it (train.resume_from={s} resumes "
                    f"from it anyway)")
                continue
            self._check_fits(s)
            try:
                self.state = ck.restore(s, self.state)
            except CheckpointCorrupt as e:
                if resume_from is not None:
                    raise ResumeError(f"train.resume_from={s}: {e}") from None
                skipped.append((s, "corrupt"))
                log(f"warning: {e}; falling back to the previous checkpoint")
                continue
            chosen = s
            break
        if chosen is None:
            raise ResumeError(_nothing_to_resume(ck, skipped))
        later = [(s, "corrupt" if (s, "corrupt") in skipped else
                  "diverged" if (s, "diverged") in skipped else "after-resume-from")
                 for s in steps if s > chosen]
        for s, why in later:
            ck.reject(s, why)
        if later:
            log(f"checkpoint{'s' * (len(later) > 1)} {_steps([s for s, _ in later])} moved to "
                f"{ck.directory / 'rejected'} (this run continues from step {chosen})")
        self.step = int(chosen)
        return True

    def _check_fits(self, step: int) -> None:
        """ResumeError when checkpoint ``step`` was saved for another vocabulary or model."""
        ck = self.checkpointer
        saved = (ck.meta(step) or {}).get("model")
        now = self.model_cfg.to_dict()
        where = f"checkpoint step {step} in {ck.directory}"
        if isinstance(saved, dict) and saved.get("vocab_size") != now["vocab_size"]:
            raise ResumeError(
                f"the vocabulary changed: {where} has {saved.get('vocab_size')} tokens, this "
                f"run's tokenizer ({self.cfg.data.tokenizer!r}) has {now['vocab_size']}"
                + (" (a char vocabulary is built from the text, so the text changed)"
                   if self.cfg.data.tokenizer == "char" else "")
                + "; resume with the data it was trained on, or train in a new out_dir")
        why = ck.mismatch(step, self.state)
        if why is not None:
            changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now)
                       if isinstance(saved, dict) and saved.get(k) != now.get(k)]
            raise ResumeError(
                f"{where} does not fit this run's model: {why}"
                + (f" (model config changed: {', '.join(changed)})" if changed else "")
                + "; resume with the config it was saved with, or train in a new out_dir")

    def _data_fingerprint(self) -> dict | None:
        from rwkv_jax.data.fingerprint import fingerprint
        from rwkv_jax.data.formats import TokenSource
        src = self.batches.source if self.batches.source is not None else self.batches.train
        return fingerprint(src) if isinstance(src, TokenSource) else None

    def _check_data(self, current: dict | None, log) -> None:
        """Compare the data with the run's data.json (recording it when absent); ResumeError
        on changed content unless ``data.allow_changed``."""
        if current is None:
            return
        from rwkv_jax.data.fingerprint import CONTENT_KEYS, fingerprint_diff
        recorded = self.run_dir.read_data_fingerprint()
        diff = {} if recorded is None else fingerprint_diff(recorded, current)
        content = {k: v for k, v in diff.items() if k in CONTENT_KEYS}
        if content:
            what = ", ".join(_change(k, a, b) for k, (a, b) in content.items())
            if not self.cfg.data.allow_changed:
                raise ResumeError(
                    f"the training data changed since this run started ({what}; recorded in "
                    f"{self.run_dir / RunDir.DATA}); resume with data.allow_changed=true to "
                    f"train on the new data, or train in a new out_dir")
            log(f"warning: the training data changed since this run started ({what}); "
                f"continuing on the new data (data.allow_changed=true)")
        if (recorded is None or diff) and self.primary:
            self.run_dir.write_data_fingerprint(current)

    def _lock(self, log) -> RunLock | None:
        """Process 0 takes the run directory's lock; every process learns whether it did."""
        lock, busy = None, None
        if self.primary:
            try:
                lock = self.run_dir.lock()
            except RunDirBusy as e:
                busy = e
        if self.topology.process_count > 1:
            from jax.experimental import multihost_utils
            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(busy is None)))
            if not ok and busy is None:
                busy = RunDirBusy(f"{self.out}: another training run is using this directory "
                                  "(process 0 could not take its lock)")
        if busy is not None:
            raise busy
        if lock is not None and lock.previous:
            p = lock.previous
            log(f"took over the lock of process {p.get('pid')} on {p.get('host')}, which is no "
                f"longer running")
        return lock

    # ---- the run -------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or pause after step ``stop_at``, as an interruption
        would: the schedule still spans max_steps; ``stop_at=0`` does only what precedes the
        first step, e.g. a fine-tune's step-0 record). Returns the last logged metrics.

        Holds the run directory's lock throughout (released on any exit). Raises
        :class:`~rwkv_jax.rundir.RunDirBusy`, :class:`ResumeError`, :class:`TrainingDiverged`
        or :class:`~rwkv_jax.train.checkpoints.CheckpointSaveError`."""
        log = _log if self.primary else (lambda msg: None)
        self.out.mkdir(parents=True, exist_ok=True)
        lock = self._lock(log)
        try:
            return self._fit(stop_at, log)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, stop_at: int | None, log) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        data_fp = self._data_fingerprint()
        steps = self.checkpointer.steps()
        if steps and t.resume_from != 0:  # a resume: the vocabulary first, then the data
            target = t.resume_from if t.resume_from in steps else steps[-1]
            self._check_fits(target)
            self._check_data(data_fp, log)
        resumed = self.restore_latest(t.resume_from, log)
        if not resumed and data_fp is not None and self.primary:
            self.run_dir.write_data_fingerprint(data_fp)
        if self.primary:  # resume_from is a one-off: a rerun of config.yaml must not repeat it
            dump_config(dataclasses.replace(cfg, train=dataclasses.replace(t, resume_from=None)),
                        self.run_dir / RunDir.RUN_CONFIG)
        mc, topo = self.model_cfg, self.topology
        mesh = topo.mesh.shape
        ft = self.finetune
        params = (f"{self.n_params / 1e6:.2f}M parameters" if ft is None else
                  f"fine-tuning {ft.path} ({ft.method.name}): {self.n_params:,} trainable of "
                  f"{self.n_total:,} parameters")
        log(f"rwkv-jax train: RWKV-{mc.version} L{mc.n_layer} C{mc.n_embd} V{mc.vocab_size}, "
            f"{params}, {len(self.batches.train_tokens):,} train / "
            f"{len(self.batches.val_tokens):,} val tokens, out_dir={self.out}"
            + (f" (resumed at step {self.step})" if resumed else "")
            + (f", {topo.process_count} processes x {topo.n_devices // topo.process_count} "
               f"devices" if topo.process_count > 1 else "")
            + (f", mesh data={mesh['data']} fsdp={mesh['fsdp']}"
               + (f" tensor={mesh['tensor']}" if mesh["tensor"] > 1 else "")
               if topo.n_devices > 1 else ""))
        if topo.n_devices > 1:
            for note in self.sharding_notes:
                log(f"sharding: {note}")
            st, mib = self.state, 2 ** 20
            log(f"per device: {bytes_per_device(st.params) / mib:.2f} MiB parameters (of "
                f"{total_bytes(st.params) / mib:.2f}), {bytes_per_device(st.opt_state) / mib:.2f}"
                f" MiB optimizer state (of {total_bytes(st.opt_state) / mib:.2f})")
        stop = min(t.max_steps, t.max_steps if stop_at is None else stop_at)
        metrics = _LastRecord()
        watch = hooks_lib.LossWatch(mc.vocab_size, t.divergence_threshold,
                                    self.checkpointer.meta(self.step) if resumed else None)
        run_hooks: list = [hooks_lib.Evaluate(t.eval_every, self.evaluate, t.max_steps),
                           metrics, watch]
        if self.primary:
            run_hooks.append(hooks_lib.MetricsFile(self.run_dir / RunDir.METRICS, t.log_every,
                                                   self.step, warn=lambda m: log(f"warning: {m}")))
            if cfg.logging.tensorboard:
                run_hooks.append(hooks_lib.TensorBoard(self.run_dir / "tensorboard"))
            if cfg.logging.progress:
                run_hooks.append(hooks_lib.Progress(t.max_steps, self.step))
        model_dict = mc.to_dict()
        run_hooks.append(hooks_lib.Checkpoint(
            self.checkpointer, cfg.checkpoint.every,
            lambda step: {"step": step, "n_params": self.n_params, "model": model_dict}, watch))
        if ft is not None and not resumed and len(self.batches.val_tokens) > 1:
            self._log_start(run_hooks, log)
        tokens_per_step = t.batch_size * t.grad_accum * cfg.data.ctx_len
        try:
            self.state = loop.run(self.state, start=self.step, stop=stop, final=t.max_steps,
                                  batch_fn=self.global_batches, step_fn=self.run_steps,
                                  hooks=run_hooks, tokens_per_step=tokens_per_step,
                                  steps_per_call=self.steps_per_call)
        except loop.Diverged as e:
            raise TrainingDiverged(f"{e}; stopped. {_after_divergence(self.checkpointer)}") \
                from None
        self.step = stop
        last = metrics.record
        if self.step < t.max_steps:
            return last
        if "val_loss" not in last:
            last.update(self.evaluate(final=True))
        self.export()  # every process: gathering the parameters is collective
        return last

    def _log_start(self, run_hooks, log) -> None:
        """A fine-tune's step 0: the checkpoint's own validation loss, before any training,
        to stderr and metrics.jsonl."""
        record = {"step": 0, **self.evaluate()}
        log(f"step 0 (the checkpoint as loaded): val_loss {record['val_loss']:.4f}, "
            f"val_bpb {record['val_bpb']:.4f}")
        for hook in run_hooks:
            if isinstance(hook, (hooks_lib.MetricsFile, hooks_lib.TensorBoard)):
                hook(0, self.state, record)

    def export(self) -> list[str]:
        """Write model.safetensors + config.json + tokenizer.json for :func:`rwkv_jax.load`
        (a fine-tune adds its lora.safetensors or state.npz: :class:`finetune.Finetune`).
        Process 0 writes; every process must call it (gathering is collective, see
        :meth:`host_model`). Returns the files written ([] on the other processes)."""
        if self.finetune is None:
            model = self.host_model()
            return self.run_dir.write_model(model, self.batches.tokenizer) if self.primary else []
        params, frozen = self._host_parts()
        if not self.primary:
            return []
        return self.finetune.export(self.run_dir, self.method.build(self.graphdef, params, frozen),
                                    params, self.batches.tokenizer)


def _steps(steps) -> str:
    return ", ".join(str(s) for s in steps) or "none"


def _loss_note(meta: dict | None, threshold: bool = True) -> str:
    m = meta or {}
    loss, thr = m.get("train_loss"), m.get("divergence_threshold")
    if not isinstance(loss, (int, float)):
        return "loss not recorded"
    return f"train loss {loss:.4g}" + (f" > threshold {thr:.4g}"
                                       if threshold and isinstance(thr, (int, float)) else "")


def _change(key: str, old, new) -> str:
    if isinstance(old, (int, float, str, type(None))) and isinstance(new, (int, float, str,
                                                                           type(None))):
        short = lambda v: v[:12] if isinstance(v, str) else v  # sha256 heads
        return f"{key} {short(old)} -> {short(new)}"
    return key


def _nothing_to_resume(ck: Checkpointer, skipped: list[tuple[int, str]]) -> str:
    parts = [f"step {s} " + ("does not verify" if why == "corrupt" else
                             f"was saved after the loss diverged ({_loss_note(ck.meta(s))})")
             for s, why in skipped]
    diverged = [s for s, why in skipped if why == "diverged"]
    return (f"no checkpoint in {ck.directory} can be resumed from ({'; '.join(parts)}); start "
            f"over with train.resume_from=0"
            + (f", or resume a diverged one anyway with train.resume_from={diverged[0]}"
               if diverged else ""))


def _after_divergence(ck: Checkpointer) -> str:
    """What a diverged run leaves: the checkpoint a rerun resumes from, named truthfully."""
    steps = ck.steps()
    healthy = [s for s in steps if ck.is_healthy(s)]
    later = [s for s in steps if s not in healthy and (not healthy or s > healthy[-1])]
    many = len(later) > 1
    diverged = (f"step{'s' * many} {_steps(later)} {'were' if many else 'was'} saved after the "
                f"loss diverged ({_loss_note(ck.meta(later[-1]))})" if later else "")
    if healthy:
        h = healthy[-1]
        return (f"The last healthy checkpoint, step {h} in {ck.directory} "
                f"({_loss_note(ck.meta(h), threshold=False)}), is intact"
                + (f"; {diverged}, a rerun skips {'them' if many else 'it'}" if later else "")
                + "; a rerun resumes from it: lower optimizer.lr or check the data.")
    if later:
        return (f"No checkpoint in {ck.directory} is from before the divergence ({diverged}); "
                f"start over with train.resume_from=0 and a lower optimizer.lr.")
    return "No checkpoint was saved; lower optimizer.lr or check the data."


class _LastRecord(loop.Every):
    """Keeps the last record the loop logged (what :meth:`Trainer.fit` returns)."""

    every_sync = True

    def __init__(self):
        super().__init__(0, at_end=False)
        self.record: dict[str, Any] = {}

    def __call__(self, step, state, record):
        self.record = record


def train(cfg: RunConfig) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics."""
    return Trainer(cfg).fit()


__all__ = ["Batches", "ResumeError", "Trainer", "TrainingDiverged", "build_batches", "train"]
