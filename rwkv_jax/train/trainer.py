"""A training run assembled from its parts: data, model, optimizer, mesh, state, hooks.

:class:`Trainer` builds the pieces a run needs and hands them to the loop
(:mod:`rwkv_jax.train.loop`); the step is the free function of :mod:`rwkv_jax.train.step`,
the mesh and shardings live in :mod:`rwkv_jax.train.mesh`, checkpoints in
:mod:`rwkv_jax.train.checkpoints`, the run directory's layout in :class:`rwkv_jax.RunDir`.

Re-running with the same ``out_dir`` resumes from the latest complete checkpoint; batches
depend only on (seed, step), so the losses continue exactly. Several processes (hosts; see
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

from rwkv_jax.model.functional import tree_names
from rwkv_jax.model.lm import RWKV
from rwkv_jax.rundir import RunDir
from rwkv_jax.train import hooks as hooks_lib
from rwkv_jax.train import loop, optim
from rwkv_jax.train.checkpoints import Checkpointer
from rwkv_jax.train.config import RunConfig, dump_config
from rwkv_jax.train.mesh import (
    Topology,
    build_topology,
    bytes_per_device,
    state_shardings,
    total_bytes,
)
from rwkv_jax.train.methods import Full
from rwkv_jax.train.state import TrainState
from rwkv_jax.train.step import Batch, StepSpec, compile_train_step


class TrainingDiverged(RuntimeError):
    """The loss or gradient became non-finite; the last complete checkpoint is intact."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Batches:
    """Train/validation tokens and the tokenizer, behind the trainer's calls."""

    train: Any           # TokenSource (or a token array)
    val: Any
    tokenizer: Any
    cfg: RunConfig

    @property
    def train_tokens(self):
        return getattr(self.train, "tokens", self.train)

    @property
    def val_tokens(self):
        return getattr(self.val, "tokens", self.val)

    def train_batch(self, step: int, host_index: int = 0, host_count: int = 1) -> Batch:
        """This host's rows of step ``step``'s batch, ``[A, B_host, T]`` (numpy)."""
        from rwkv_jax.data import sample_batch
        t, d = self.cfg.train, self.cfg.data
        micro = []
        for m in range(t.grad_accum):  # each micro-batch is its own (seed, step) draw
            b = sample_batch(self.train, step=step * t.grad_accum + m, batch_size=t.batch_size,
                             ctx_len=d.ctx_len, seed=t.seed, sampler=d.sampler,
                             host_index=host_index, host_count=host_count)
            x, y = b[0], b[1]
            mask = getattr(b, "mask", None)
            micro.append((x, y, np.ones(x.shape, np.float32) if mask is None
                          else np.asarray(mask, np.float32)))
        x, y, mask = (np.stack(a) for a in zip(*micro))
        return Batch(x, y, mask)

    def eval_batches(self):
        from rwkv_jax.data import eval_batches
        return eval_batches(self.val, batch_size=self.cfg.train.batch_size,
                            ctx_len=self.cfg.data.ctx_len,
                            max_batches=self.cfg.train.eval_batches)

    def sample_prompt(self, n_tokens: int = 24) -> str:
        """The start of the first validation window (what the data looks like)."""
        ids = np.asarray(self.val_tokens[:n_tokens]).tolist()
        return self.tokenizer.decode_bytes(ids).decode("utf-8", errors="ignore")


def build_batches(cfg: RunConfig) -> Batches:
    """Open the configured data (default: the stdlib corpus) and split train/validation."""
    from rwkv_jax import data
    d = cfg.data
    source = data.open_tokens(d.path, tokenizer=d.tokenizer, cache_dir=d.cache_dir,
                              max_bytes=d.max_bytes)
    split = data.split_source(source, d.val_fraction, ctx_len=d.ctx_len)
    return Batches(split.train, split.val, source.tokenizer, cfg)


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
        self.cfg = cfg
        self.run_dir = RunDir(cfg.out_dir)
        self.out = self.run_dir.path
        self.batches = batches or build_batches(cfg)
        tok = self.batches.tokenizer
        model_cfg = cfg.model
        if not cfg.vocab_size_explicit:
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        elif model_cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({tok.vocab_size})")
        self.model_cfg = model_cfg
        t = cfg.train
        self.topology: Topology = build_topology(cfg.mesh.data, cfg.mesh.fsdp, t.batch_size,
                                                 cfg.mesh.tensor)
        self.primary = self.topology.primary
        with _on_host():  # the full model exists only in host memory; devices get shards
            model = RWKV(model_cfg, rngs=nnx.Rngs(t.seed))
        self.method = Full()
        self.graphdef, params, frozen = self.method.split(model)
        self.n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
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
                             l2wrap=t.l2wrap)
        self.train_step = compile_train_step(self.spec, self.state_shardings,
                                             topo.batch_sharding(3, 1), topo.replicated)
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
        return Batch(*(self.topology.global_batch(a, batch_axis=1) for a in local[:3]))

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
        from jax.experimental import multihost_utils
        params, frozen = self.state.params, self.state.frozen
        if self.topology.process_count > 1:
            params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
        else:
            params, frozen = jax.device_get((params, frozen))
        to_jnp = lambda t: jax.tree.map(jax.numpy.asarray, t)  # noqa: E731
        model = self.method.build(self.graphdef, to_jnp(params), to_jnp(frozen))
        self._host_model = (self.state, model)
        return model

    def evaluate(self, state: TrainState | None = None) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over the configured eval windows,
        each from the empty state (:func:`rwkv_jax.evaluate.score_windows`, policy "reset").

        Several processes: every process reads the same windows and feeds its block of rows
        of each batch into the one data-parallel evaluation; the sums come back replicated,
        so every process returns the same numbers (process 0 logs them)."""
        from rwkv_jax.evaluate import score_windows
        b = self.cfg.train.batch_size // self.host_count
        rows = slice(self.host_index * b, (self.host_index + 1) * b)

        def put(a):
            return self.topology.global_batch(a[rows], batch_axis=0)

        res = score_windows(self.model(state), self.batches.eval_batches(),
                            state_policy="reset", tokenizer=self.batches.tokenizer, put=put)
        return {"val_loss": res.loss, "val_bpb": res.bits_per_byte}

    # ---- checkpoints ---------------------------------------------------------------------------
    def restore_latest(self) -> bool:
        """Restore the latest complete checkpoint; False when there is none."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return False
        self.state = self.checkpointer.restore(latest, self.state)
        self.step = int(latest)
        return True

    # ---- the run -------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or pause after step ``stop_at``, as an interruption
        would: the schedule still spans max_steps). Returns the last logged metrics."""
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.primary:
            dump_config(cfg, self.run_dir / RunDir.RUN_CONFIG)
        resumed = self.restore_latest()
        log = _log if self.primary else (lambda msg: None)
        mc, topo = self.model_cfg, self.topology
        mesh = topo.mesh.shape
        log(f"rwkv-jax train: RWKV-{mc.version} L{mc.n_layer} C{mc.n_embd} V{mc.vocab_size}, "
            f"{self.n_params / 1e6:.2f}M parameters, {len(self.batches.train_tokens):,} train / "
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
        stop = min(t.max_steps, stop_at or t.max_steps)
        metrics = _LastRecord()
        run_hooks: list = [hooks_lib.Evaluate(t.eval_every, self.evaluate), metrics]
        if self.primary:
            run_hooks.append(hooks_lib.MetricsFile(self.run_dir / RunDir.METRICS, t.log_every,
                                                   self.step))
            if cfg.logging.tensorboard:
                run_hooks.append(hooks_lib.TensorBoard(self.run_dir / "tensorboard"))
            if cfg.logging.progress:
                run_hooks.append(hooks_lib.Progress(t.max_steps, self.step))
        run_hooks.append(hooks_lib.Checkpoint(
            self.checkpointer, cfg.checkpoint.every,
            lambda step: {"step": step, "n_params": self.n_params}))
        tokens_per_step = t.batch_size * t.grad_accum * cfg.data.ctx_len
        try:
            self.state = loop.run(self.state, start=self.step, stop=stop, final=t.max_steps,
                                  batch_fn=self.global_batch, step_fn=self.train_step,
                                  hooks=run_hooks, tokens_per_step=tokens_per_step)
        except loop.Diverged as e:
            raise TrainingDiverged(
                f"{e}; stopped. The last complete checkpoint in {self.run_dir / 'checkpoints'} "
                f"(step {self.checkpointer.latest_step()}) is intact; lower optimizer.lr or "
                f"check the data.") from None
        self.step = stop
        last = metrics.record
        if self.step < t.max_steps:
            return last
        if "val_loss" not in last:
            last.update(self.evaluate())
        self.export()  # every process: gathering the parameters is collective
        return last

    def export(self) -> list[str]:
        """Write model.safetensors + config.json + tokenizer.json for :func:`rwkv_jax.load`
        (process 0 writes; every process must call it, see :meth:`host_model`). Returns the
        files written ([] on the other processes)."""
        model = self.host_model()
        return self.run_dir.write_model(model, self.batches.tokenizer) if self.primary else []


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


__all__ = ["Batches", "Trainer", "TrainingDiverged", "build_batches", "train"]
