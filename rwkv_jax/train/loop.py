"""The training loop: steps, and hooks at the steps that want them. Nothing else.

Each step is ``state, out = step_fn(state, batch_fn(step))``. The device is only waited on
at a step some hook wants (:meth:`Hook.wants`): there the step's metrics are fetched, a
non-finite step stops the run (:class:`Diverged`; the compiled step left the state as it
was, so no hook sees a bad state), and each hook that wants the step, or that observes
every such step (``every_sync``: logging), is called in order with one shared ``record``
(the step's logged values, which hooks may add to: evaluation adds ``val_loss``).
Throughput is measured between such steps, excluding hook time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax


class Diverged(RuntimeError):
    """A step's loss, gradient or update was not finite (the state was kept as before it)."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"non-finite loss or gradient at step {step} (loss={loss}, "
                         f"grad_norm={grad_norm})")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class Hook(Protocol):
    """Something done at some steps: logging, evaluation, checkpointing, export.

    ``every_sync``: also called at every step another hook made the loop sync on."""

    every_sync: bool

    def wants(self, step: int, final: bool) -> bool:
        """Whether to be called after ``step`` (1-based count of steps done); ``final``: the
        last step of the run."""

    def __call__(self, step: int, state, record: dict[str, Any]) -> None:
        """Act after ``step``; ``record`` holds the step's values (and what earlier hooks
        added)."""

    def close(self) -> None:
        """The loop is over (normally or not)."""


def run(state, *, start: int, stop: int, final: int, batch_fn: Callable[[int], Any],
        step_fn: Callable, hooks: Sequence[Hook], tokens_per_step: int):
    """Run steps ``start .. stop-1`` (0-based) and return the state after them.

    ``final``: the run's last step count (``stop`` may be earlier, a pause);
    ``tokens_per_step`` feeds the ``tokens_per_s`` of each record. Raises :class:`Diverged`.
    """
    t0, timed = time.perf_counter(), 0
    try:
        for i in range(start, stop):
            state, out = step_fn(state, batch_fn(i))
            step, timed = i + 1, timed + 1
            due = [h for h in hooks if h.wants(step, step == final)]
            if not due:
                continue
            out = jax.device_get(out)  # the only host sync: at steps a hook wants
            if not out["ok"]:
                raise Diverged(step, float(out["loss"]), float(out["grad_norm"]))
            dt = time.perf_counter() - t0
            record = {"step": step, "train_loss": float(out["loss"]), "lr": float(out["lr"]),
                      "tokens_per_s": timed * tokens_per_step / dt,
                      "grad_norm": float(out["grad_norm"])}
            for hook in hooks:
                if hook in due or hook.every_sync:
                    hook(step, state, record)
            t0, timed = time.perf_counter(), 0  # the next interval excludes hook time
    finally:
        for hook in hooks:
            hook.close()
    return state


class Every:
    """A hook schedule: every ``n`` steps (0 = never) and, with ``at_end``, the final step;
    ``every_sync``: called at every synced step as well."""

    every_sync = False

    def __init__(self, n: int, at_end: bool = True):
        self.n, self.at_end = n, at_end

    def wants(self, step: int, final: bool) -> bool:
        return (self.n > 0 and step % self.n == 0) or (self.at_end and final)

    def close(self) -> None:
        pass
