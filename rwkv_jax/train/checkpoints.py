"""Training checkpoints: orbax, atomic, verified on restore, resumable on any mesh.

Layout of the checkpoint directory (``run/checkpoints/``)::

    <step>/              one orbax checkpoint: "state" (params, opt_state) and "meta" (JSON)
    verified.json        the step a restore last read back and verified
    rejected/<step>-<why>/   checkpoints moved out of the way (corrupt, skipped, superseded)

``<step>/`` holds the trainable parameters and the optimizer state (the frozen parameters
of a fine-tune come from its base checkpoint again on resume; the step is the directory's
name). A save is atomic: orbax writes to a temporary directory and renames it, so a run
killed mid-save resumes from the previous checkpoint. Restoring reads each array straight
into the sharding of the target, so a run saved on one mesh resumes on another.

Integrity. A save refuses a state with a non-finite value and records, in the meta item,
the shape, dtype and a 64-bit digest of every array (:func:`digest`). A restore computes the
digests of what it read and compares: a mismatch, a non-finite value or an unreadable
checkpoint raises :class:`CheckpointCorrupt` (the caller falls back to an older one and
moves the bad one to ``rejected/``). The digest is a position-weighted sum of the array's
bits, computed on the devices where the array lives: it is the same for any sharding and any
number of processes, so a checkpoint saved on one mesh verifies on another.

Rotation. After each save the newest ``keep`` checkpoints stay, and so do the newest one
saved with a healthy loss (``save(..., healthy=True)``; see the trainer's divergence check)
and the one named in ``verified.json``: rotation never deletes the last checkpoint known to
be good.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import write_text_atomic

__all__ = ["DIGEST", "CheckpointCorrupt", "CheckpointSaveError", "Checkpointer", "digest"]

DIGEST = "wsum32x2-v1"  # the digest's name, recorded beside the values
VERIFIED = "verified.json"
REJECTED = "rejected"


class CheckpointCorrupt(CheckpointError):
    """A checkpoint could not be read, or what was read does not match its recorded digests
    (or holds a non-finite value)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only or unwritable directory); the
    checkpoints saved before are untouched."""


# ---- the digest ------------------------------------------------------------------------------
def _u32(c: int) -> jax.Array:
    return jnp.asarray(c, jnp.uint32)


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * _u32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _u32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (one per element; two per 8-byte element)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    raise TypeError(f"cannot digest an array of dtype {x.dtype}")


def _leaf_digest(x: jax.Array) -> jax.Array:
    """``uint32[2]``: sum_i w_i * odd(h1(i)) and sum_i fmix(w_i) * odd(h2(i)), mod 2^32.

    Each weight is odd, so changing any one word always changes both sums; the two lanes use
    independent weights, so a random multi-word change goes unnoticed with probability about
    2^-64. The flat index comes from per-axis iotas (no reshape), so the array keeps its
    sharding and the sums are reduced where the shards are."""
    w = _words(jnp.asarray(x))
    idx = jnp.zeros(w.shape, jnp.uint32)
    for axis, n in enumerate(w.shape):
        idx = idx * _u32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    h1 = _fmix(idx + _u32(0x9E3779B9)) | _u32(1)
    h2 = _fmix(idx ^ _u32(0x5BD1E995)) | _u32(1)
    return jnp.stack([jnp.sum(w * h1, dtype=jnp.uint32),
                      jnp.sum(_fmix(w) * h2, dtype=jnp.uint32)])


def _digests_and_finite(tree):
    sums = jax.tree.map(_leaf_digest, tree)
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sums, jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)


@functools.lru_cache(maxsize=8)
def _digest_fn(mesh):
    """The jitted digest, its (small) outputs replicated over ``mesh`` so that every process
    can read them (None: single-device arrays)."""
    if mesh is None:
        return jax.jit(_digests_and_finite)
    from jax.sharding import NamedSharding, PartitionSpec
    return jax.jit(_digests_and_finite, out_shardings=NamedSharding(mesh, PartitionSpec()))


def digest(tree) -> tuple[dict[str, dict[str, Any]], bool]:
    """``({path: {"shape", "dtype", "sum": [lane0, lane1]}}, all_finite)`` of a pytree of
    arrays (``path`` is ``jax.tree_util.keystr`` of the leaf's path). The same for any sharding
    of the arrays and in every process (:data:`DIGEST`)."""
    leaves = jax.tree.leaves(tree)
    mesh = next((getattr(x.sharding, "mesh", None) for x in leaves
                 if isinstance(x, jax.Array)), None)
    sums, finite = jax.device_get(_digest_fn(mesh)(tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for (path, x), s in zip(flat, jax.tree.leaves(sums)):
        out[jax.tree_util.keystr(path)] = {"shape": list(np.shape(x)), "dtype": str(x.dtype),
                                           "sum": [int(v) for v in np.asarray(s)]}
    return out, bool(finite)


def _first_line(e: BaseException, limit: int = 200) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    else:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        text = text.split(" See full TensorStore details")[0]  # then a repr of the whole spec
    return text if len(text) <= limit else text[:limit] + "..."


# ---- the checkpointer ------------------------------------------------------------------------
class Checkpointer:
    """Saves, verifies, restores and rotates ``{"params", "opt_state"}`` of a
    :class:`TrainState` (module docstring), keeping the last ``keep`` checkpoints and the
    last good one."""

    def __init__(self, directory: pathlib.Path, keep: int):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours (_rotate): it must spare the last good one
            create=True,
            # synchronous: the next step donates the buffers being saved
            enable_async_checkpointing=False,
            # several processes: every one saves/restores its shards, process 0 writes the
            # metadata and commits the step (orbax barriers between them)
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
        self.directory = pathlib.Path(directory).absolute()
        self.keep = keep
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self._metas: dict[int, dict | None] = {}

    # ---- what is there -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The committed checkpoints' steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict | None:
        """The meta item saved with ``step`` (None when it cannot be read)."""
        if step not in self._metas:
            ocp = self._ocp
            try:
                m = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # noqa: BLE001 - unreadable: the restore will say why
                m = None
            self._metas[step] = m if isinstance(m, dict) else None
        return self._metas[step]

    def is_healthy(self, step: int) -> bool:
        """Whether ``step`` was saved with a healthy loss (checkpoints that recorded nothing
        count as healthy)."""
        m = self.meta(step)
        return m is None or m.get("healthy", True) is not False

    def verified_step(self) -> int | None:
        """The step the last successful restore verified (``verified.json``), if any."""
        try:
            v = json.loads((self.directory / VERIFIED).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return v if isinstance(v, int) else None

    def mismatch(self, step: int, state) -> str | None:
        """Why ``state``'s arrays cannot take checkpoint ``step``'s (different paths, shapes
        or dtypes), from its recorded digests; None when they fit or nothing was recorded."""
        recorded = ((self.meta(step) or {}).get("integrity") or {}).get("arrays")
        if not isinstance(recorded, dict):
            return None
        flat, _ = jax.tree_util.tree_flatten_with_path(self._items(state))
        now = {jax.tree_util.keystr(p): x for p, x in flat}
        missing, extra = sorted(set(recorded) - set(now)), sorted(set(now) - set(recorded))
        if missing or extra:
            return ("the checkpoint's arrays differ from this run's ("
                    + ", ".join([f"only in the checkpoint: {missing[0]}"] * bool(missing)
                                + [f"only in this run: {extra[0]}"] * bool(extra)) + ")")
        for key, x in now.items():
            r = recorded[key]
            if list(np.shape(x)) != list(r.get("shape", [])) or str(x.dtype) != r.get("dtype"):
                return (f"{key} is {r.get('dtype')}{r.get('shape')} in the checkpoint and "
                        f"{x.dtype}{list(np.shape(x))} in this run")
        return None

    # ---- saving ------------------------------------------------------------------------------
    @staticmethod
    def _items(state) -> dict:
        return {"params": state.params, "opt_state": state.opt_state}

    def save(self, step: int, state, meta: dict[str, Any], *, healthy: bool = True) -> None:
        """Save ``state`` as checkpoint ``step`` with ``meta`` (+ the digests and ``healthy``),
        then rotate. Raises :class:`CheckpointSaveError` naming the directory when the state is
        not finite or the write fails (the earlier checkpoints are left as they were)."""
        ocp = self._ocp
        items = self._items(state)
        arrays, finite = digest(items)
        previous = self.latest_step()
        kept = (f"checkpoint step {previous} is intact" if previous is not None
                else "no earlier checkpoint")
        if not finite:
            raise CheckpointSaveError(f"{self.directory}: refusing to save step {step}: the state "
                                      f"holds a non-finite value; {kept}")
        meta = {**meta, "healthy": bool(healthy),
                "integrity": {"algorithm": DIGEST, "arrays": arrays}}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore wrap OSErrors in many types
            self._remove_temporaries(step)
            raise CheckpointSaveError(f"{self.directory}: cannot save checkpoint step {step} "
                                      f"({_first_line(e)}); {kept}") from e
        self._metas[step] = meta
        self._rotate()

    def _remove_temporaries(self, step: int) -> None:
        """Best effort: the orbax temporary a failed save left behind."""
        import shutil
        if jax.process_index() != 0:
            return
        for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)

    def _rotate(self) -> None:
        """Delete all but the newest ``keep``, the newest healthy and the verified one."""
        steps = self.steps()
        keep = set(steps[-self.keep:]) if self.keep > 0 else set()
        healthy = [s for s in steps if self.is_healthy(s)]
        if healthy:
            keep.add(healthy[-1])
        verified = self.verified_step()
        if verified is not None:
            keep.add(verified)
        for s in steps:
            if s not in keep:
                self.manager.delete(s)  # every process calls it; orbax lets process 0 delete
                self._metas.pop(s, None)

    # ---- restoring ---------------------------------------------------------------------------
    def restore(self, step: int, state):
        """``state`` with params and opt_state read from checkpoint ``step`` and verified, each
        array in the sharding ``state``'s arrays have (their values are not used). Raises
        :class:`CheckpointCorrupt` when it cannot be read or does not verify; on success
        records ``step`` in ``verified.json``."""
        try:
            restored = self._read(step, state)
        except Exception as e:  # a damaged file surfaces as any error type
            raise CheckpointCorrupt(f"{self.directory / str(step)}: cannot be read "
                                    f"({_first_line(e)})") from e
        self._verify(step, restored)
        if jax.process_index() == 0:
            write_text_atomic(self.directory / VERIFIED, json.dumps({"step": int(step)}))
        return state._replace(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                              opt_state=restored["opt_state"])

    def _read(self, step: int, state) -> dict:
        """The arrays of checkpoint ``step``, read into ``state``'s shardings."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._items(state))
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def _verify(self, step: int, restored: dict) -> None:
        where = self.directory / str(step)
        arrays, finite = digest(restored)
        recorded = ((self.meta(step) or {}).get("integrity") or {})
        if recorded.get("algorithm") == DIGEST:
            want = recorded.get("arrays") or {}
            bad = [k for k in arrays if (want.get(k) or {}).get("sum") != arrays[k]["sum"]]
            bad += sorted(set(want) - set(arrays))
            if bad:
                raise CheckpointCorrupt(f"{where}: {len(bad)} of {len(want)} arrays do not match "
                                        f"their recorded checksums (first: {bad[0]})")
        if not finite:
            raise CheckpointCorrupt(f"{where}: holds a non-finite value")

    # ---- moving aside ------------------------------------------------------------------------
    def reject(self, step: int, why: str) -> pathlib.Path:
        """Move checkpoint ``step`` to ``rejected/<step>-<why>`` (kept, out of the way of the
        steps this run will save); returns where it went. Every process calls it."""
        src = self.directory / str(step)
        dst = self.directory / REJECTED / f"{step}-{why}"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / REJECTED / f"{step}-{why}-{n}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"rwkv_jax:reject:{step}")
        self._metas.pop(step, None)
        self.manager.reload()
        return dst
