"""The training loop: one jitted pure step, orbax checkpoints, exact resume.

A run directory (``cfg.out_dir``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/<step>/`` (orbax; a save is atomic, so an interrupted
save leaves the previous checkpoint as the latest) and, at the end, the exported model
(``model.safetensors`` + ``config.json`` + ``tokenizer.json``) that :func:`rwkv_jax.load`
reads. Re-running with the same ``out_dir`` resumes from the latest complete checkpoint;
batches depend only on (seed, step), so the losses continue exactly.
"""

from __future__ import annotations

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
        self.mesh = self._mesh()
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.params = jax.device_put(params, replicated)
        self.opt_state = jax.device_put(self.tx.init(self.params), replicated)
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, "data", None))
        self.step = 0
        self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1))
        self._eval_step = jax.jit(self._eval_fn)
        self._manager = None

    # ---- pure functions ---------------------------------------------------------------------
    def _mesh(self):
        n = self.cfg.mesh.data
        devices = jax.devices()
        n = len(devices) if n == -1 else n
        if n > len(devices) or self.cfg.train.batch_size % n:
            raise ValueError(f"mesh.data={n}: needs <= {len(devices)} devices and to divide "
                             f"train.batch_size={self.cfg.train.batch_size}")
        return jax.sharding.Mesh(np.array(devices[:n]), ("data",))

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
                enable_async_checkpointing=False)
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
        """Validation loss (nats/token) and bits per byte over the configured eval windows."""
        total, count, n_bytes = 0.0, 0.0, 0
        tok = self.batches.tokenizer
        from rwkv_jax.data import count_utf8_bytes
        for x, y, mask in self.batches.eval_batches():
            s, c = self._eval_step(self.params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
            total += float(s)
            count += float(c)
            n_bytes += count_utf8_bytes(np.asarray(y)[np.asarray(mask) > 0], tok)
        loss = total / max(count, 1.0)
        return {"val_loss": loss, "val_bpb": total / max(n_bytes, 1) / math.log(2)}

    # ---- the loop -----------------------------------------------------------------------------
    def _metrics_file(self):
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
        dump_config(cfg, self.out / "config.yaml")
        resumed = self.restore_latest()
        _log(f"rwkv-jax train: RWKV-{self.model_cfg.version} L{self.model_cfg.n_layer} "
             f"C{self.model_cfg.n_embd} V{self.model_cfg.vocab_size}, "
             f"{self.n_params / 1e6:.2f}M parameters, {len(self.batches.train_tokens):,} train / "
             f"{len(self.batches.val_tokens):,} val tokens, out_dir={self.out}"
             + (f" (resumed at step {self.step})" if resumed else ""))
        last: dict[str, float] = {}
        tokens_per_step = t.batch_size * t.grad_accum * cfg.data.ctx_len
        writer = self._tensorboard()
        bar = self._progress()
        with self._metrics_file() as metrics:
            t0, steps_timed = time.perf_counter(), 0
            while self.step < min(t.max_steps, stop_at or t.max_steps):
                xs, ys = self.batches.train_batch(self.step)
                xs = jax.device_put(xs, self.batch_sharding)
                ys = jax.device_put(ys, self.batch_sharding)
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
        self.export()
        return last

    def _progress(self):
        if not self.cfg.logging.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.max_steps, initial=self.step, desc="train",
                    file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def _tensorboard(self):
        if not self.cfg.logging.tensorboard:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("logging.tensorboard=true needs the tensorboardX package: "
                             "pip install 'rwkv-jax[tensorboard]'") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def model(self) -> RWKV:
        """The current parameters as a model (float32 parameters)."""
        return nnx.merge(self.graphdef, self.params)

    def export(self) -> pathlib.Path:
        """Write model.safetensors + config.json + tokenizer.json for :func:`rwkv_jax.load`."""
        path = save_model(self.model(), self.out / "model.safetensors")
        (self.out / "config.json").write_text(json.dumps(self.model_cfg.to_dict(), indent=1))
        (self.out / "tokenizer.json").write_text(json.dumps(self.batches.tokenizer.to_dict()))
        return path


def train(cfg: RunConfig) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics."""
    return Trainer(cfg).fit()
