"""The training step as a free function: ``train_step(state, batch) -> (state, metrics)``.

:func:`train_step` is pure; :func:`compile_train_step` binds its static description
(:class:`StepSpec`: the model's graph, the optimizer, the schedule, the loss options) and
jits it with explicit shardings and the state donated. Benchmarks and tests import these;
the training loop calls :func:`compile_train_steps`' program: up to K steps in one
dispatch (:func:`train_steps`, a ``lax.while_loop`` of :func:`train_step` over stacked
batches), so a small model's step is not paced by Python.

One step: ``grad_accum`` micro-batches (a ``lax.scan``; each is ``batch_size`` rows), the
masked cross-entropy (:func:`rwkv_jax.evaluate.cross_entropy`) with RWKV-LM's L2Wrap,
AdamW with the official groups, the learning rate read from the schedule at ``state.step``.
With ``chunk_len`` set, each micro-batch's rows run in chunks with the recurrent state
carried between them and every chunk rematerialised in the backward ("infctx": activation
memory follows the chunk, not the row; see :func:`loss_fn`).
Randomness (LoRA dropout) comes from ``state.rng`` folded with the step and the micro-batch
index, so a resumed run draws the same masks.
A step whose loss, gradient norm or updated parameters / optimizer state are not all
finite changes nothing (the state is kept, ``metrics["ok"]`` is False): the loop stops
there and the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rwkv_jax.evaluate import cross_entropy, token_nll
from rwkv_jax.model import functional
from rwkv_jax.model.layers import dropout_key
from rwkv_jax.train import optim
from rwkv_jax.train.state import TrainState


class Batch(NamedTuple):
    """One optimizer step's data: ``[A, B, T]`` for A micro-batches of B rows of T tokens.

    x: input ids (int32); y: target ids (int32); mask: float32 loss weights (1 = scored);
    resets: bool, True at the first token of a new document in a packed row (or None:
    every row is one stretch of text from the empty state)."""

    x: Any
    y: Any
    mask: Any
    resets: Any = None


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a step (hashable: the compiled step is cached on it).

    graphdef: the graph definition of ``method.split(model)``; the step's model is
      ``method.build(graphdef, state.params, state.frozen)``.
    method: what trains (:mod:`rwkv_jax.train.methods`): the whole model, adapters, or
      the initial state.
    tx: the optimizer (without the learning rate; see :func:`rwkv_jax.train.optim`).
    lr: ``lr(step) -> float32`` (jnp, traced on the step counter).
    l2wrap: apply RWKV-LM's L2Wrap to the logits.
    chunk_len: 0 = each row runs whole; > 0 = in chunks of this many tokens (it divides
      the row length), the state carried between them (:func:`loss_fn`).
    chunk_grad: "full" (backpropagate through the carried state: exact) or "truncated"
      (``stop_gradient`` on it between chunks: an approximation; same memory, since each
      chunk's input state is kept either way).
    """

    graphdef: Any
    method: Any
    tx: optax.GradientTransformation
    lr: Callable
    l2wrap: bool = True
    chunk_len: int = 0
    chunk_grad: str = "full"

    def __post_init__(self):
        if self.chunk_grad not in ("full", "truncated"):
            raise ValueError(f"chunk_grad must be 'full' or 'truncated', got "
                             f"{self.chunk_grad!r}")


def loss_fn(params, frozen, micro: Batch, key: jax.Array, *, spec: StepSpec) -> jax.Array:
    """Masked mean cross-entropy of one micro-batch (``[B, T]`` arrays), with L2Wrap.
    ``key``: the micro-batch's PRNG key (typed), for dropout.

    With ``spec.chunk_len`` = L > 0 the T tokens run as T/L chunks in a ``lax.scan``, the
    model's state carried from one chunk to the next, and each chunk's forward and loss
    under ``jax.checkpoint``: the backward keeps only each chunk's input state and recomputes
    the chunk, so activation memory is that of L tokens (plus T/L states). The value is the
    same quantity as whole rows (the per-chunk masked sums over the whole micro-batch's
    mask count), L2Wrap is normalised by the whole B·T, and with ``chunk_grad="full"`` the
    gradient is the whole-row gradient (up to float rounding); "truncated" stops it at the
    carried state, so a chunk's loss trains nothing through what earlier chunks wrote into
    the state (the initial state still trains through the first chunk). LoRA dropout draws
    chunk ``i``'s masks from ``fold_in(key, i)``."""
    model = spec.method.build(spec.graphdef, params, frozen)
    state0 = spec.method.initial_state(params, micro.x.shape[0])
    if spec.chunk_len:
        return _chunked_loss(model, state0, micro, key, spec)
    extra = {} if micro.resets is None else {"resets": micro.resets}
    with dropout_key(key):
        logits, _ = model(micro.x, state0, **extra)
    loss = cross_entropy(logits, micro.y, micro.mask)
    if spec.l2wrap:
        loss = optim.l2wrap(loss, logits)
    return loss


def _chunked_loss(model, state0, micro: Batch, key: jax.Array, spec: StepSpec) -> jax.Array:
    """:func:`loss_fn` for ``spec.chunk_len`` > 0 (see there)."""
    B, T = micro.x.shape
    L = spec.chunk_len
    if T % L:
        raise ValueError(f"chunk_len {L} does not divide the row length {T}")
    mask = jnp.ones((B, T), jnp.float32) if micro.mask is None else micro.mask.astype(
        jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    if state0 is None:
        state0 = model.init_state(B)
    moduledef, values = functional.split(model)

    def chunks(a):  # [B, T] -> [T/L, B, L]
        return None if a is None else a.reshape(B, T // L, L).swapaxes(0, 1)

    def chunk(values, state, x, y, m, resets, count, key):
        extra = {} if resets is None else {"resets": resets}
        with dropout_key(key):
            logits, state = moduledef.merge(values)(x, state, **extra)
        nll, _ = token_nll(logits, y)
        loss = jnp.sum(nll * m) / count
        if spec.l2wrap:
            loss = optim.l2wrap(loss, logits, B * T)
        return loss, state

    # prevent_cse=False: inside a scan the recomputation cannot be merged away anyway
    chunk = jax.checkpoint(chunk, prevent_cse=False)

    def body(carry, xs):
        total, state = carry
        i, x, y, m, resets = xs
        loss, state = chunk(values, state, x, y, m, resets, count, jax.random.fold_in(key, i))
        if spec.chunk_grad == "truncated":
            state = jax.lax.stop_gradient(state)
        return (total + loss, state), None

    xs = (jnp.arange(T // L), chunks(micro.x), chunks(micro.y), chunks(mask),
          chunks(micro.resets))
    (loss, _), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), state0), xs)
    return loss


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state: TrainState, batch: Batch, *, spec: StepSpec):
    """One optimizer step (pure). Returns ``(new state, {"loss", "grad_norm", "lr", "ok"})``;
    ``loss`` is the mean over the micro-batches."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec=spec))
    n_micro = batch.x.shape[0]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if n_micro == 1:
        loss, grads = grad_fn(state.params, state.frozen, jax.tree.map(lambda a: a[0], batch),
                              jax.random.fold_in(key, 0))
    else:
        def body(acc, xs):
            micro, i = xs
            loss, grads = grad_fn(state.params, state.frozen, micro, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, (loss, grads)), None
        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(body, zero, (batch, jnp.arange(n_micro)))
        loss, grads = jax.tree.map(lambda g: g / n_micro, (loss, grads))
    grad_norm = optax.tree.norm(grads)
    lr = spec.lr(state.step)
    updates, new_opt = spec.tx.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
          & _all_finite(new_opt))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    new_state = state._replace(
        step=state.step + 1, params=jax.tree.map(keep, new_params, state.params),
        opt_state=jax.tree.map(keep, new_opt, state.opt_state))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "ok": ok}


def train_steps(state: TrainState, batches: Batch, n: jax.Array, *, spec: StepSpec):
    """Steps ``0 .. n-1`` of ``batches`` (each field ``[K, A, B, T]``; ``n`` <= K, an int32
    scalar, traced: one program serves every count), each one :func:`train_step`, in one
    ``lax.while_loop``. Stops after the first step that is not ``ok`` (that step changed
    nothing; later ones do not run). Returns ``(state, metrics)``: the last step's metrics
    (as :func:`train_step`'s) and ``"step"``, ``state.step`` after it (the 1-based count of
    the step that failed, when ``ok`` is False). Rows of ``batches`` past ``n`` are unread.
    Each step computes exactly what :func:`train_step` computes for its batch."""
    def cond(carry):
        i, _, out = carry
        return (i < n) & out["ok"]

    def body(carry):
        i, st, _ = carry
        batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False),
                             batches)
        st, out = train_step(st, batch, spec=spec)
        return i + 1, st, {k: v.astype(out0[k].dtype) for k, v in out.items()}

    f32 = jnp.zeros((), jnp.float32)
    out0 = {"loss": f32, "grad_norm": f32, "lr": f32, "ok": jnp.asarray(True)}
    _, state, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, out0))
    return state, {**out, "step": state.step}


def compile_train_steps(spec: StepSpec, state_shardings, batches_sharding,
                        replicated) -> Callable:
    """:func:`train_steps` bound to ``spec`` and jitted: ``steps(state, batches, n) ->
    (state, metrics)``, shardings as :func:`compile_train_step` (``batches_sharding``: one
    sharding for the ``[K, A, B, T]`` arrays), the input state donated."""
    return jax.jit(functools.partial(train_steps, spec=spec),
                   in_shardings=(state_shardings, batches_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def compile_train_step(spec: StepSpec, state_shardings, batch_sharding,
                       replicated) -> Callable:
    """:func:`train_step` bound to ``spec`` and jitted: ``step(state, batch) -> (state,
    metrics)`` with the state's shardings (a ``TrainState`` of shardings) in and out, the
    batch's (one sharding for all of its arrays) in, the metrics ``replicated``, and the
    input state donated (its buffers become the output's)."""
    return jax.jit(functools.partial(train_step, spec=spec),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
