"""The hooks the training loop calls (:mod:`rwkv_jax.train.loop`): evaluation, the metrics
file, the progress bar, TensorBoard and checkpoints. Each owns one side effect; only the
primary process gets the ones that write logs."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from rwkv_jax.io.files import write_text_atomic
from rwkv_jax.train.loop import Every


class Evaluate(Every):
    """Adds the validation metrics (``evaluate(state) -> dict``) to the record every
    ``every`` steps and at the end."""

    def __init__(self, every: int, evaluate: Callable[[Any], dict[str, float]]):
        super().__init__(every, at_end=every > 0)
        self.evaluate = evaluate

    def __call__(self, step, state, record):
        record.update(self.evaluate(state))


class MetricsFile(Every):
    """Appends each record (every ``every`` steps, the final one, and every other synced
    step) as one whole JSON line to ``metrics.jsonl``. On resume, lines after the resumed
    step are dropped first (they were written after the checkpoint the run continues from),
    and a torn last line (an interrupted write) is dropped with a warning."""

    every_sync = True

    def __init__(self, path: pathlib.Path, every: int, resumed_step: int):
        super().__init__(every)
        self.path = path
        if path.exists():
            from rwkv_jax.data.jsonl import read_jsonl
            kept = [line for _, line in read_jsonl(path, drop_torn_last=True)
                    if isinstance(line, dict) and line.get("step", 0) <= resumed_step]
            _write_lines(path, kept)
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, step, state, record):
        self.f.write(json.dumps(record) + "\n")  # one write per line: whole lines only
        self.f.flush()

    def close(self):
        self.f.close()


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


class Checkpoint(Every):
    """Saves the state every ``every`` steps and at the end (all processes take part)."""

    def __init__(self, checkpointer, every: int, meta: Callable[[int], dict]):
        super().__init__(every)
        self.checkpointer, self.meta = checkpointer, meta

    def __call__(self, step, state, record):
        self.checkpointer.save(step, state, self.meta(step))
