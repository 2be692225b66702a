"""Save and load a model's recurrent state (e.g. after a prompt, to continue later).

A state file holds every leaf of the state pytree (``model.init_state(B)`` structure,
float32) under a dotted path name, e.g. ``0.att_x_prev``, ``0.wkv.aa``, ``3.ffn_x_prev``,
plus a small JSON header::

    {"format": "rwkv-jax-state", "format_version": 1, "rwkv_version": "4",
     "n_layer": 4, "n_embd": 128, "batch_size": 1, "head_size": 64}

Two containers, picked by suffix: ``.npz`` (the header is the 0-d string array
``__header__``) and ``.safetensors`` (the header is the ``rwkv_jax_state`` metadata entry).
Loading checks the header and every array against ``model.init_state(batch_size)`` and
raises one :class:`StateError` listing every mismatch.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "StateError",
    "load_state",
    "save_state",
    "state_arrays",
]

STATE_FORMAT = "rwkv-jax-state"
STATE_FORMAT_VERSION = 1
_HEADER_KEY = "__header__"
_META_KEY = "rwkv_jax_state"


class StateError(ValueError):
    """A state file is unreadable or does not fit the model; the message says why."""


def _name(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        elif isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        else:
            parts.append(str(p).strip(".[]'\""))
    return ".".join(parts)


def state_arrays(state) -> dict[str, np.ndarray]:
    """The state's leaves as float32 numpy arrays by dotted path name."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {_name(path): np.asarray(leaf, np.float32) for path, leaf in flat}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_name(path): tuple(np.shape(leaf)) for path, leaf in flat}


def _header(model, state) -> dict[str, Any]:
    cfg = model.config
    leaves = jax.tree.leaves(state)
    if not leaves:
        raise StateError("empty state")
    header = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
              "rwkv_version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
              "batch_size": int(np.shape(leaves[0])[0])}
    if cfg.head_size is not None:  # the matrix-state versions
        header["head_size"] = cfg.head_size
    return header


def save_state(path: str | os.PathLike, state, model) -> pathlib.Path:
    """Write ``state`` (as returned by ``model(...)`` or generation) to ``.npz``/``.safetensors``.

    ``model`` supplies the header (version and sizes) that :func:`load_state` checks. The file
    is written to a temporary and renamed into place.
    """
    path = pathlib.Path(path)
    header = _header(model, state)
    _validate(_shapes(state), model, header["batch_size"], f"state to save in {path}")
    arrays = state_arrays(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **{_HEADER_KEY: np.array(json.dumps(header))}, **arrays)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={_META_KEY: json.dumps(header)})
    else:
        raise StateError(f"{path}: unknown state file suffix (use .npz or .safetensors)")
    os.replace(tmp, path)
    return path


def _read(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.is_file():
        raise StateError(f"{path}: no such state file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
            raw = meta.get(_META_KEY)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            raw = arrays.pop(_HEADER_KEY, None)
            raw = None if raw is None else str(raw)
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - any container error becomes one clear message
        raise StateError(f"{path}: not a readable state file ({type(e).__name__}: {e})") from None
    if raw is None:
        raise StateError(f"{path}: no rwkv-jax state header (not written by save_state?)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: bad state header ({e})") from None
    if header.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not an rwkv-jax state file (format {header.get('format')!r})")
    if header.get("format_version") != STATE_FORMAT_VERSION:
        raise StateError(f"{path}: state format version {header.get('format_version')!r}, this "
                         f"reader knows {STATE_FORMAT_VERSION}")
    return header, arrays


def _validate(shapes: dict[str, tuple[int, ...]], model, batch_size: int, where: str):
    arrays = shapes
    want = _shapes(jax.eval_shape(lambda: model.init_state(batch_size)))
    problems = []
    if set(arrays) - set(want):
        problems.append(f"unknown arrays: {', '.join(sorted(set(arrays) - set(want)))}")
    if set(want) - set(arrays):
        problems.append(f"missing arrays: {', '.join(sorted(set(want) - set(arrays)))}")
    for k in sorted(set(want) & set(arrays)):
        if arrays[k] != want[k]:
            problems.append(f"{k}: shape {arrays[k]}, expected {want[k]}")
    if problems:
        raise StateError(f"{where} does not fit the model:\n  " + "\n  ".join(problems))


def load_state(path: str | os.PathLike, model):
    """Read a state written by :func:`save_state`, checked against ``model``.

    Returns the state pytree (float32 jax arrays) of the saved batch size. Raises
    :class:`StateError` naming every mismatch (other version or sizes, wrong shapes).
    """
    path = pathlib.Path(path)
    header, arrays = _read(path)
    cfg = model.config
    problems = []
    for key, want in (("rwkv_version", cfg.version), ("n_layer", cfg.n_layer),
                      ("n_embd", cfg.n_embd)):
        if header.get(key) != want:
            problems.append(f"{key}: file {header.get(key)!r}, model {want!r}")
    if cfg.head_size is not None and "head_size" in header \
            and header["head_size"] != cfg.head_size:
        problems.append(f"head_size: file {header['head_size']!r}, model {cfg.head_size!r}")
    if problems:
        raise StateError(f"{path}: state is for another model (RWKV-{header.get('rwkv_version')}"
                         f" L{header.get('n_layer')} C{header.get('n_embd')}):\n  "
                         + "\n  ".join(problems))
    batch = header.get("batch_size")
    if not isinstance(batch, int) or batch <= 0:
        raise StateError(f"{path}: bad batch_size {batch!r} in the header")
    _validate(_shapes(arrays), model, batch, str(path))
    template = jax.eval_shape(lambda: model.init_state(batch))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[_name(p)], jnp.float32) for p, _ in flat])
