"""The training loop: steps, and hooks at the steps that want them. Nothing else.

Steps run several to a call (:func:`plan`: up to ``steps_per_call``, and a call ends at every
step some hook wants, :meth:`Hook.wants`), so the host dispatches once per call, not once
per step. After each call its metrics are fetched and a non-finite step stops the run
(:class:`Diverged`; the compiled steps stopped at it and left the state as it was, so no
hook sees a bad state). At a step a hook wants, each hook that wants it, or that observes
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


def plan(start: int, stop: int, final: int, hooks: Sequence[Hook],
         steps_per_call: int) -> list[tuple[int, int, bool]]:
    """The calls that run steps ``start .. stop-1``: ``(first, n, synced)`` each, ``n`` <=
    ``steps_per_call`` steps from step ``first`` (0-based); a call ends at every step a hook
    wants (``synced``: hooks are called after it)."""
    calls, first = [], start
    for i in range(start, stop):
        step = i + 1
        due = any(h.wants(step, step == final) for h in hooks)
        if due or step - first == steps_per_call or step == stop:
            calls.append((first, step - first, due))
            first = step
    return calls


def run(state, *, start: int, stop: int, final: int, batch_fn: Callable[[int, int, int], Any],
        step_fn: Callable, hooks: Sequence[Hook], tokens_per_step: int,
        steps_per_call: int = 1):
    """Run steps ``start .. stop-1`` (0-based) and return the state after them.

    The steps run in calls of :func:`plan`: ``state, out = step_fn(state, batches, n)`` runs
    ``n`` steps on ``batches = batch_fn(first, n, k)`` (stacked for ``k`` steps, the longest
    call of the plan, so one program serves them all; rows past ``n`` unused). The next
    call's batches are made while the device runs the current call; each call's metrics are
    then fetched (``out``: the last step's ``loss``, ``grad_norm``, ``lr``, ``ok`` and
    ``step``, its 1-based count), and a step that was not ``ok`` raises :class:`Diverged`
    (``step_fn`` stopped there and left the state as it was before that step).
    ``final``: the run's last step count (``stop`` may be earlier, a pause);
    ``tokens_per_step`` feeds the ``tokens_per_s`` of each record.
    """
    calls = plan(start, stop, final, hooks, max(1, steps_per_call))
    k = max((n for _, n, _ in calls), default=1)
    t0, timed = time.perf_counter(), 0
    try:
        batches = batch_fn(calls[0][0], calls[0][1], k) if calls else None
        for j, (first, n, synced) in enumerate(calls):
            state, out = step_fn(state, batches, n)
            if j + 1 < len(calls):  # made on the host while the device runs this call
                batches = batch_fn(calls[j + 1][0], calls[j + 1][1], k)
            out = jax.device_get(out)  # waits for this call's steps
            if not out["ok"]:
                raise Diverged(int(out["step"]), float(out["loss"]), float(out["grad_norm"]))
            step, timed = first + n, timed + n
            if not synced:
                continue
            dt = time.perf_counter() - t0
            record = {"step": step, "train_loss": float(out["loss"]), "lr": float(out["lr"]),
                      "tokens_per_s": timed * tokens_per_step / dt,
                      "grad_norm": float(out["grad_norm"])}
            for hook in hooks:
                if hook.wants(step, step == final) or hook.every_sync:
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
