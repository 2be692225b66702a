"""Training checkpoints: orbax, atomic, resumable on any mesh.

``run/checkpoints/<step>/`` holds the trainable parameters and the optimizer state (the
frozen parameters of a fine-tune come from its base checkpoint again on resume, and the step
is the directory's name). A save is atomic: orbax writes to a temporary directory and
renames it, so a run killed mid-save resumes from the previous checkpoint. Restoring reads
each array straight into the sharding of the target, so a run saved on one mesh resumes on
another (another device count included).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp


class Checkpointer:
    """Saves and restores ``{"params", "opt_state"}`` of a :class:`TrainState` every so
    often, keeping the last ``keep`` checkpoints."""

    def __init__(self, directory: pathlib.Path, keep: int):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # synchronous: the next step donates the buffers being saved
            enable_async_checkpointing=False,
            # several processes: every one saves/restores its shards, process 0 writes the
            # metadata and commits the step (orbax barriers between them)
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        items = {"params": state.params, "opt_state": state.opt_state}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, state):
        """``state`` with params and opt_state read from checkpoint ``step``, each array in
        the sharding ``state``'s arrays have (their values are not used)."""
        ocp = self._ocp
        target = {"params": state.params, "opt_state": state.opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return state._replace(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                              opt_state=restored["opt_state"])
