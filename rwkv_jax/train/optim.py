"""Optimizer, schedule and loss pieces of the official RWKV training recipe.

* Parameter groups (reference §2.5, §4.4, §5.5): learning-rate multipliers by parameter
  name (``time_decay`` 2x, ``time_first`` 3x, RWKV-7 ``w0`` 2x) and weight decay only on
  matrices named ``*.weight`` with two or more dimensions.
* Schedule: warmup factor ``start + (1 - start)·step/warmup``, then cosine or exponential
  decay from ``lr`` to ``lr_final`` over the run, as RWKV-LM's trainer computes it.
* L2Wrap: the loss value is unchanged; in backward, each position's largest logit gets
  ``grad_output · max_logit · 1e-4/(B·T)`` added (reference §1, the corrected form).

The cross-entropy itself is :func:`rwkv_jax.evaluate.cross_entropy` (defined once).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from rwkv_jax import versions
from rwkv_jax.train.config import OptimizerConfig, ScheduleConfig

L2WRAP_FACTOR = 1e-4


def lr_multiplier(path: str, version: str, layerwise_lr: bool = True) -> float:
    """Learning-rate scale of the parameter with dotted name ``path``: the version's official
    groups (``SPEC.lr_multipliers``, by leaf name), 1 elsewhere or without layerwise_lr."""
    if not layerwise_lr:
        return 1.0
    return versions.spec(version).lr_multipliers.get(path.rsplit(".", 1)[-1], 1.0)


def decays(path: str, ndim: int) -> bool:
    """Weight decay applies to ``*.weight`` tensors with >= 2 dims (emb, head, linears)."""
    return path.endswith(".weight") and ndim >= 2


def schedule(opt: OptimizerConfig, sch: ScheduleConfig, total_steps: int):
    """``lr(step)``: the learning rate of (0-based) optimizer step ``step``, in float32.

    Written in ``jnp`` so the jitted step computes it from the traced step counter (the
    compiled program is the same for every step and run length); the host calls the same
    function for logging, ``float(lr(step))``.
    """
    lr0, lr1, warm = opt.lr, opt.lr_final, sch.warmup_steps
    f32 = jnp.float32

    def fn(step):
        step = jnp.asarray(step, f32)
        progress = jnp.clip(step / max(total_steps - 1, 1), 0.0, 1.0)
        if sch.kind == "constant":
            lr = jnp.asarray(lr0, f32)
        elif sch.kind == "exponential":
            if lr0 == 0 or lr1 == 0:  # RWKV-LM falls back to linear when an end is 0
                lr = lr0 + (lr1 - lr0) * progress
            else:
                lr = lr0 * jnp.exp(math.log(lr1 / lr0) * progress)
        else:  # cosine
            f = lr1 / lr0 if lr0 else 0.0
            lr = lr0 * ((0.5 + f / 2) + (0.5 - f / 2) * jnp.cos(math.pi * progress))
        if warm > 0:
            ramp = sch.warmup_start + (1 - sch.warmup_start) * step / warm
            lr = jnp.where(step < warm, lr * ramp, lr)
        return lr.astype(f32)

    return fn


def _scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching constant in ``scales``."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(params, names, version: str,
                   opt: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with official groups, *without* the learning rate: the caller multiplies the
    updates by ``-lr`` (passed into the jitted step as a value, so the compiled program
    does not depend on the schedule or the run length).

    ``names``: a pytree like ``params`` of dotted official names.
    """
    scales = jax.tree.map(lambda n: lr_multiplier(n, version, opt.layerwise_lr), names)
    mask = jax.tree.map(lambda n, p: decays(n, p.ndim), names, params)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts += [
        optax.scale_by_adam(b1=opt.beta1, b2=opt.beta2, eps=opt.eps),
        optax.add_decayed_weights(opt.weight_decay, mask=mask),
        _scale_by_tree(scales),
    ]
    return optax.chain(*parts)


def l2wrap(loss: jax.Array, logits: jax.Array, positions: int | None = None) -> jax.Array:
    """Identity on ``loss``; its backward adds RWKV-LM's L2Wrap gradient to ``logits``.

    ``logits`` [B, T, V]: the position of each row's maximum gets
    ``grad_output · max · 1e-4 / positions``; ``positions`` defaults to ``B·T``. A loss
    computed in chunks passes the whole batch's ``B·T`` for each chunk's logits, so the
    gradient is that of the unchunked loss.
    """
    n = logits.shape[0] * logits.shape[1] if positions is None else int(positions)
    return _l2wrap(loss, logits, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _l2wrap(loss, logits, n):
    del logits, n
    return loss


def _l2wrap_fwd(loss, logits, n):
    del n
    return loss, logits


def _l2wrap_bwd(n, logits, g):
    idx = jnp.argmax(logits, axis=-1)
    top = jnp.take_along_axis(logits, idx[..., None], axis=-1)
    gy = (jax.nn.one_hot(idx, logits.shape[-1], dtype=logits.dtype)
          * top * jnp.asarray(L2WRAP_FACTOR / n, logits.dtype))
    return g, (g * gy).astype(logits.dtype)


_l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)
