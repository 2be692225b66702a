"""The training loop: one jitted pure step, orbax checkpoints, exact resume.

A run directory (``cfg.out_dir``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/<step>/`` (orbax; a save is atomic, so an interrupted
save leaves the previous checkpoint as the latest) and, at the end, the exported model
(``model.safetensors`` + ``config.json`` + ``tokenizer.json``) that :func:`rwkv_jax.load`
reads. Re-running with the same ``out_dir`` resumes from the latest complete checkpoint;
batches depend only on (seed, step), so the losses continue exactly.

Several processes (hosts; see :mod:`rwkv_jax.train.distributed`) run one data-parallel job
over a mesh of all their devices: each process samples only its own rows of the (seed, step)
batch, so the global batch, and the losses, are the single-process ones. Every process takes
part in each step, evaluation and checkpoint (orbax coordinates the save; ``out_dir`` must be
on a filesystem all processes share); only process 0 writes logs, metrics, TensorBoard,
config.yaml and the exported model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rwkv_jax.checkpoint import save as save_model
from rwkv_jax.model.lm import RWKV
from rwkv_jax.train import optim
from rwkv_jax.train.config import RunConfig, dump_config


class TrainingDiverged(RuntimeError):
    """The loss or gradient became non-finite; the last complete checkpoint is intact."""


def _names(params) -> Any:
    """A pytree like ``params`` holding each leaf's dotted official name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
        params)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Batches:
    """Train/validation tokens and the tokenizer, behind the trainer's three calls."""

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    tokenizer: Any
    cfg: RunConfig

    def train_batch(self, step: int, host_index: int = 0, host_count: int = 1):
        from rwkv_jax.data import sample_batch
        t, d = self.cfg.train, self.cfg.data
        xs, ys = [], []
        for micro in range(t.grad_accum):  # each micro-batch is its own (seed, step) draw
            x, y = sample_batch(self.train_tokens, step=step * t.grad_accum + micro,
                                batch_size=t.batch_size, ctx_len=d.ctx_len, seed=t.seed,
                                sampler=d.sampler, host_index=host_index,
                                host_count=host_count)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)

    def eval_batches(self):
        from rwkv_jax.data import eval_batches
        return eval_batches(self.val_tokens, batch_size=self.cfg.train.batch_size,
                            ctx_len=self.cfg.data.ctx_len,
                            max_batches=self.cfg.train.eval_batches)


def build_batches(cfg: RunConfig) -> Batches:
    """Open the configured data (default: the stdlib corpus) and split train/validation."""
    from rwkv_jax import data
    d = cfg.data
    source = data.open_tokens(d.path, tokenizer=d.tokenizer, cache_dir=d.cache_dir,
                              max_bytes=d.max_bytes)
    train_tokens, val_tokens = data.split_tokens(source.tokens, d.val_fraction)
    if len(train_tokens) <= d.ctx_len + 1 or len(val_tokens) <= 1:
        raise ValueError(f"data.path: {d.path or 'default corpus'} has {len(source.tokens)} "
                         f"tokens, too few for ctx_len={d.ctx_len}")
    return Batches(train_tokens, val_tokens, source.tokenizer, cfg)


class Trainer:
    """Owns the model, optimizer, jitted step and the run directory of one training run."""

    def __init__(self, cfg: RunConfig, batches: Batches | None = None):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.out_dir)
        self.batches = batches or build_batches(cfg)
        tok = self.batches.tokenizer
        model_cfg = cfg.model
        if not cfg.vocab_size_explicit:
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        elif model_cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({tok.vocab_size})")
        self.model_cfg = model_cfg
        model = RWKV(model_cfg, rngs=nnx.Rngs(cfg.train.seed))
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        self.lr = optim.schedule(cfg.optimizer, cfg.schedule, cfg.train.max_steps)
        self.tx = optim.make_optimizer(params, _names(params), model_cfg.version, cfg.optimizer)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.primary = self.process_index == 0  # the one process with side effects
        self.mesh = self._mesh()
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if self.process_count == 1:
            self.params = jax.device_put(params, replicated)
            self.opt_state = jax.device_put(self.tx.init(self.params), replicated)
        else:  # every process built the same values (same seed); host copies -> global arrays
            self.params = jax.device_put(jax.device_get(params), replicated)
            self.opt_state = jax.device_put(jax.device_get(self.tx.init(params)), replicated)
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, "data", None))
        self.eval_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec("data", None))
        self.host_index, self.host_count = self._host_rows()
        self.step = 0
        self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1))
        self._eval_step = jax.jit(self._eval_fn)
        self._manager = None

    # ---- pure functions ---------------------------------------------------------------------
    def _mesh(self):
        n = self.cfg.mesh.data
        devices = jax.devices()
        n = len(devices) if n == -1 else n
        if self.process_count > 1:
            return self._multiprocess_mesh(n)
        if n > len(devices) or self.cfg.train.batch_size % n:
            raise ValueError(f"mesh.data={n}: needs <= {len(devices)} devices and to divide "
                             f"train.batch_size={self.cfg.train.batch_size}")
        return jax.sharding.Mesh(np.array(devices[:n]), ("data",))

    def _multiprocess_mesh(self, n: int):
        """``n`` devices, the same number from each process, in process order: process p
        holds the p-th contiguous block of the batch rows."""
        p_count, batch = self.process_count, self.cfg.train.batch_size
        local = jax.local_device_count()
        if n < p_count or n % p_count or n // p_count > local or batch % n:
            raise ValueError(f"mesh.data={n}: with {p_count} processes of {local} devices "
                             f"each, needs a multiple of {p_count} up to {p_count * local} "
                             f"that divides train.batch_size={batch}")
        per = n // p_count
        by_process: dict[int, list] = {}
        for d in jax.devices():
            by_process.setdefault(d.process_index, []).append(d)
        devices = [d for p in sorted(by_process) for d in sorted(by_process[p],
                                                                 key=lambda d: d.id)[:per]]
        return jax.sharding.Mesh(np.array(devices), ("data",))

    def _host_rows(self) -> tuple[int, int]:
        """(host_index, host_count) for :func:`rwkv_jax.data.sample_batch`: this process's
        devices hold global batch rows ``host_index * B/host_count ..``, a contiguous block."""
        if self.process_count == 1:
            return 0, 1
        batch = self.cfg.train.batch_size
        shape = (1, batch, self.cfg.data.ctx_len)
        rows = {idx[1].indices(batch)[:2]
                for idx in self.batch_sharding.addressable_devices_indices_map(shape).values()}
        lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
        size = hi - lo
        if (size * self.process_count != batch or lo % size
                or sum(b - a for a, b in rows) != size):
            raise RuntimeError(f"process {self.process_index}: batch rows {sorted(rows)} are "
                               f"not one block of {batch}/{self.process_count}")
        return lo // size, batch // size

    def _global_batch(self, local: np.ndarray, sharding, batch_axis: int):
        """The global array of which this process holds rows ``local`` (its block; with one
        process, all of them)."""
        if self.process_count == 1:
            return jax.device_put(local, sharding)
        shape = list(local.shape)
        shape[batch_axis] *= self.host_count
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

    def _loss(self, params, x, y):
        model = nnx.merge(self.graphdef, params)
        logits, _ = model(x)
        loss = optim.cross_entropy(logits, y)
        if self.cfg.train.l2wrap:
            loss = optim.l2wrap(loss, logits)
        return loss

    def _step_fn(self, params, opt_state, xs, ys, lr):
        """One optimizer step over ``grad_accum`` micro-batches xs, ys [A, B, T] at ``lr``."""
        grad_fn = jax.value_and_grad(self._loss)
        if xs.shape[0] == 1:
            loss, grads = grad_fn(params, xs[0], ys[0])
        else:
            def body(acc, xy):
                loss, grads = grad_fn(params, *xy)
                return jax.tree.map(jnp.add, acc, (loss, grads)), None
            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zero, (xs, ys))
            loss, grads = jax.tree.map(lambda g: g / xs.shape[0], (loss, grads))
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        # a non-finite step changes nothing: the trainer stops with the last good state
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state),
                {"loss": loss, "grad_norm": grad_norm, "ok": ok})

    def _eval_fn(self, params, x, y, mask):
        model = nnx.merge(self.graphdef, params)
        logits, _ = model(x)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
        m = mask.astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(m)

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.checkpoint.keep, create=True,
                # synchronous: the next step donates the buffers being saved
                enable_async_checkpointing=False,
                # several processes: every one saves/restores its shards, process 0 writes the
                # metadata and commits the step (orbax barriers between them)
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
            self._manager = ocp.CheckpointManager((self.out / "checkpoints").absolute(),
                                                  options=opts)
        return self._manager

    def save_checkpoint(self) -> None:
        import orbax.checkpoint as ocp
        state = {"params": self.params, "opt_state": self.opt_state}
        self.manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": self.step, "n_params": self.n_params})))
        self.manager.wait_until_finished()

    def restore_latest(self) -> bool:
        """Restore the latest complete checkpoint; False when there is none."""
        import orbax.checkpoint as ocp
        latest = self.manager.latest_step()
        if latest is None:
            return False
        target = {"params": self.params, "opt_state": self.opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        self.params = restored["state"]["params"]
        self.opt_state = restored["state"]["opt_state"]
        self.step = int(latest)
        return True

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over the configured eval windows.

        Several processes: every process reads the same windows and feeds its block of rows
        of each batch into the one data-parallel evaluation; the sums come back replicated,
        so every process returns the same numbers (process 0 logs them)."""
        total, count, n_bytes = 0.0, 0.0, 0
        tok = self.batches.tokenizer
        from rwkv_jax.data import count_utf8_bytes
        for x, y, mask in self.batches.eval_batches():
            if self.process_count == 1:
                args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
            else:
                b = x.shape[0] // self.host_count
                rows = slice(self.host_index * b, (self.host_index + 1) * b)
                args = tuple(self._global_batch(a[rows], self.eval_sharding, 0)
                             for a in (x, y, mask))
            s, c = self._eval_step(self.params, *args)
            total += float(s)
            count += float(c)
            n_bytes += count_utf8_bytes(np.asarray(y)[np.asarray(mask) > 0], tok)
        loss = total / max(count, 1.0)
        return {"val_loss": loss, "val_bpb": total / max(n_bytes, 1) / math.log(2)}

    # ---- the loop -----------------------------------------------------------------------------
    def _metrics_file(self):
        if not self.primary:
            return contextlib.nullcontext()
        path = self.out / "metrics.jsonl"
        if path.exists():  # drop lines written after the checkpoint we resumed from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(k + "\n" for k in kept))
        return open(path, "a")

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or pause after step ``stop_at``, as an interruption
        would: the schedule still spans max_steps). Returns the last logged metrics."""
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.primary:
            dump_config(cfg, self.out / "config.yaml")
        resumed = self.restore_latest()
        log = _log if self.primary else (lambda msg: None)
        log(f"rwkv-jax train: RWKV-{self.model_cfg.version} L{self.model_cfg.n_layer} "
            f"C{self.model_cfg.n_embd} V{self.model_cfg.vocab_size}, "
            f"{self.n_params / 1e6:.2f}M parameters, {len(self.batches.train_tokens):,} train / "
            f"{len(self.batches.val_tokens):,} val tokens, out_dir={self.out}"
            + (f" (resumed at step {self.step})" if resumed else "")
            + (f", {self.process_count} processes x "
               f"{self.mesh.devices.size // self.process_count} devices"
               if self.process_count > 1 else ""))
        last: dict[str, float] = {}
        tokens_per_step = t.batch_size * t.grad_accum * cfg.data.ctx_len
        writer = self._tensorboard()
        bar = self._progress()
        with self._metrics_file() as metrics:
            t0, steps_timed = time.perf_counter(), 0
            while self.step < min(t.max_steps, stop_at or t.max_steps):
                # this process's rows -> the global batch, sharded over all processes
                xs, ys = self.batches.train_batch(self.step, self.host_index, self.host_count)
                xs = self._global_batch(xs, self.batch_sharding, 1)
                ys = self._global_batch(ys, self.batch_sharding, 1)
                lr = np.float32(self.lr(self.step))
                self.params, self.opt_state, out = self._train_step(
                    self.params, self.opt_state, xs, ys, lr)
                self.step += 1
                steps_timed += 1
                done = self.step == t.max_steps
                evaluate = t.eval_every > 0 and (self.step % t.eval_every == 0 or done)
                checkpoint = self.step % cfg.checkpoint.every == 0 or done
                if self.step % t.log_every == 0 or evaluate or checkpoint or done:
                    out = jax.device_get(out)  # the only host sync: at logging steps
                    if not out["ok"]:
                        raise TrainingDiverged(
                            f"non-finite loss or gradient at step {self.step} "
                            f"(loss={out['loss']}, grad_norm={out['grad_norm']}); stopped. "
                            f"The last complete checkpoint in {self.out / 'checkpoints'} "
                            f"(step {self.manager.latest_step()}) is intact; lower "
                            f"optimizer.lr or check the data.")
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, "train_loss": float(out["loss"]),
                           "lr": float(self.lr(self.step - 1)),
                           "tokens_per_s": steps_timed * tokens_per_step / dt,
                           "grad_norm": float(out["grad_norm"])}
                    if evaluate:
                        rec.update(self.evaluate())
                    if metrics is not None:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    if writer is not None:
                        for k, v in rec.items():
                            if k != "step":
                                writer.add_scalar(k, v, self.step)
                    last = rec
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                                        tok_s=f"{rec['tokens_per_s']:.0f}",
                                        **({"val": f"{rec['val_loss']:.3f}"} if evaluate else {}))
                    if checkpoint:
                        self.save_checkpoint()
                    # the next interval's tokens/s excludes evaluation and checkpoint time
                    t0, steps_timed = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if self.step < t.max_steps:
            return last
        if "val_loss" not in last:
            last.update(self.evaluate())
        if self.primary:
            self.export()
        return last

    def _progress(self):
        if not self.cfg.logging.progress or not self.primary:
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.max_steps, initial=self.step, desc="train",
                    file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def _tensorboard(self):
        if not self.cfg.logging.tensorboard or not self.primary:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("logging.tensorboard=true needs the tensorboardX package: "
                             "pip install 'rwkv-jax[tensorboard]'") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def model(self) -> RWKV:
        """The current parameters as a model (float32 parameters).

        Several processes: the model holds this process's own (complete, replicated) copy of
        the parameters on one local device, so it runs without the other processes."""
        params = self.params
        if self.process_count > 1:
            params = jax.tree.map(lambda a: a.addressable_data(0), params)
        return nnx.merge(self.graphdef, params)

    def export(self) -> pathlib.Path:
        """Write model.safetensors + config.json + tokenizer.json for :func:`rwkv_jax.load`."""
        path = save_model(self.model(), self.out / "model.safetensors")
        (self.out / "config.json").write_text(json.dumps(self.model_cfg.to_dict(), indent=1))
        (self.out / "tokenizer.json").write_text(json.dumps(self.batches.tokenizer.to_dict()))
        return path


def train(cfg: RunConfig) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics."""
    return Trainer(cfg).fit()
