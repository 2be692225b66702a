"""The hooks the training loop calls (:mod:`rwkv_jax.train.loop`): evaluation, the metrics
file, the progress bar, TensorBoard and checkpoints. Each owns one side effect; only the
primary process gets the ones that write logs."""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from rwkv_jax.io.files import write_text_atomic
from rwkv_jax.train.loop import Every


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Evaluate(Every):
    """Adds the validation metrics (``evaluate(state, final) -> dict``) to the record every
    ``every`` steps and at the end; ``final`` is True at step ``final_step`` (the run's
    last), where the evaluation may score more windows."""

    def __init__(self, every: int, evaluate: Callable[..., dict[str, float]],
                 final_step: int | None = None):
        super().__init__(every, at_end=every > 0)
        self.evaluate, self.final_step = evaluate, final_step

    def __call__(self, step, state, record):
        record.update(self.evaluate(state, final=step == self.final_step))


class MetricsFile(Every):
    """Appends each record (every ``every`` steps, the final one, and every other synced
    step) as one whole JSON line to ``metrics.jsonl``. On resume, lines after the resumed
    step are dropped first (they were written after the checkpoint the run continues from),
    and a torn last line (an interrupted write, a full disk) is dropped with a warning.

    Whole lines only: each line is one ``write`` to a file opened for appending, and a short
    write (a full disk) is cut back off before the error is raised, so the file never ends in
    half a line that this process wrote."""

    every_sync = True

    def __init__(self, path: pathlib.Path, every: int, resumed_step: int,
                 warn: Callable[[str], None] = _warn):
        super().__init__(every)
        self.path = path
        if path.exists():
            import warnings

            from rwkv_jax.data.jsonl import read_jsonl
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kept = [line for _, line in read_jsonl(path, drop_torn_last=True)
                        if isinstance(line, dict) and line.get("step", 0) <= resumed_step]
            for w in caught:
                warn(str(w.message))
            _write_lines(path, kept)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                          | getattr(os, "O_CLOEXEC", 0), 0o644)

    def __call__(self, step, state, record):
        self.write_line((json.dumps(record) + "\n").encode("utf-8"))

    def write_line(self, data: bytes) -> None:
        """Append ``data`` (one line) whole, or not at all (OSError naming the file)."""
        size = os.fstat(self.fd).st_size
        try:
            n = os.write(self.fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            raise OSError(e.errno, f"cannot append to the metrics file: "
                                   f"{e.strerror or e}", str(self.path)) from None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_lines(path: pathlib.Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


class Progress(Every):
    """A tqdm bar on stderr, moved on at every synced step, showing loss, tokens per second
    and the validation loss."""

    every_sync = True

    def __init__(self, total: int, initial: int):
        super().__init__(0, at_end=False)
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)
        self.shown = initial

    def __call__(self, step, state, record):
        self.bar.update(step - self.shown)
        self.shown = step
        self.bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                             tok_s=f"{record['tokens_per_s']:.0f}",
                             **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record
                                else {}))

    def close(self):
        self.bar.close()


class TensorBoard(Every):
    """Each synced step's values as TensorBoard scalars (needs tensorboardX)."""

    every_sync = True

    def __init__(self, logdir: pathlib.Path):
        super().__init__(0, at_end=False)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("logging.tensorboard=true needs the tensorboardX package: "
                             "pip install 'rwkv-jax[tensorboard]'") from None
        self.writer = SummaryWriter(str(logdir))

    def __call__(self, step, state, record):
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class LossWatch(Every):
    """Follows the training loss to tell a healthy checkpoint from one saved after the run
    diverged.

    A loss is healthy when it is finite and at most the divergence threshold: ``threshold``
    when given, else ``max(10 x the best smoothed loss so far, ln(vocab_size) + 3)`` (ln V is
    what a uniform guess scores, so no sane run exceeds it by 3 nats; 10x the best means the
    run has blown up). The smoothed loss is an exponential moving average (weight 0.1) of the
    training loss at every synced step. ``resumed``: the :meth:`summary` saved with the
    checkpoint a run resumes from (the average continues)."""

    every_sync = True
    FACTOR, MARGIN, WEIGHT = 10.0, 3.0, 0.1

    def __init__(self, vocab_size: int, threshold: float | None = None,
                 resumed: dict | None = None):
        super().__init__(0, at_end=False)
        self.floor = math.log(max(vocab_size, 2)) + self.MARGIN
        self.fixed = threshold
        r = resumed or {}
        self.smoothed = _finite_or_none(r.get("smoothed_loss"))
        self.best = _finite_or_none(r.get("best_smoothed_loss"))

    def __call__(self, step, state, record):
        loss = record.get("train_loss")
        if loss is None or not math.isfinite(loss):
            return
        self.smoothed = loss if self.smoothed is None else (
            self.smoothed + self.WEIGHT * (loss - self.smoothed))
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)

    def threshold(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(self.FACTOR * self.best, self.floor) if self.best is not None else self.floor

    def healthy(self, loss: float) -> bool:
        return math.isfinite(loss) and loss <= self.threshold()

    def summary(self, loss: float) -> dict[str, Any]:
        """What a checkpoint records: its loss, the average, the best, the threshold."""
        return {"train_loss": loss, "smoothed_loss": self.smoothed,
                "best_smoothed_loss": self.best, "divergence_threshold": self.threshold()}


def _finite_or_none(v):
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


class Checkpoint(Every):
    """Saves the state every ``every`` steps and at the end (all processes take part), with
    ``meta(step)`` and ``watch``'s verdict on the step's loss (the watch must come before
    this hook in the loop's list, to have seen the step; None: every save counts as
    healthy)."""

    def __init__(self, checkpointer, every: int, meta: Callable[[int], dict],
                 watch: LossWatch | None = None):
        super().__init__(every)
        self.checkpointer, self.meta, self.watch = checkpointer, meta, watch

    def __call__(self, step, state, record):
        loss, meta = record["train_loss"], self.meta(step)
        if self.watch is None:
            self.checkpointer.save(step, state, meta)
            return
        self.checkpointer.save(step, state, {**meta, **self.watch.summary(loss)},
                               healthy=self.watch.healthy(loss))
