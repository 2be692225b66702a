"""Save and load a model's recurrent state (e.g. after a prompt, to continue later).

A state file holds every leaf of the state pytree (``model.init_state(B)`` structure,
float32) under a dotted path name, e.g. ``0.att_x_prev``, ``0.wkv.aa``, ``3.ffn_x_prev``,
plus a small JSON header::

    {"format": "rwkv-jax-state", "format_version": 1, "rwkv_version": "4",
     "n_layer": 4, "n_embd": 128, "batch_size": 1, "head_size": 64}

Two containers, picked by suffix: ``.npz`` (the header is the 0-d string array
``__header__``) and ``.safetensors`` (the header is the ``rwkv_jax_state`` metadata entry).
Loading checks the header and every array against ``model.init_state(batch_size)`` and
raises one :class:`StateError` listing every mismatch. Hostile or broken files are refused
the same way, before any array data is read: a header that is not a JSON object of the
fields above with their types, arrays that are not float (float16/bfloat16/float32/float64)
or not of the expected shapes, truncated or corrupt containers, anything but a regular file;
and after reading, NaN/inf values (a state holding them would poison every later token).
Memory stays bounded by the shapes the model expects (``.npz`` members are read only once
their ``.npy`` headers match; ``.safetensors`` data is memory-mapped).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rwkv_jax.model.functional import dotted_name

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import atomic_path, describe, file_kind
from rwkv_jax.io.finite import nonfinite_summary
from rwkv_jax.io.npz import NpzReader
from rwkv_jax.io.safetensors import read_safetensors

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
_MAX_HEADER_CHARS = 1 << 16  # the header is ~150 characters
_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
                 np.dtype(np.float64)}
# header field -> type; format / format_version are checked first, head_size is optional
_HEADER_FIELDS = {"rwkv_version": str, "n_layer": int, "n_embd": int, "batch_size": int,
                  "head_size": int}


class StateError(ValueError):
    """A state file is unreadable or does not fit the model; the message says why."""


def state_arrays(state) -> dict[str, np.ndarray]:
    """The state's leaves as float32 numpy arrays by dotted path name."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {dotted_name(path): np.asarray(leaf, np.float32) for path, leaf in flat}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {dotted_name(path): tuple(np.shape(leaf)) for path, leaf in flat}


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
    if path.suffix not in (".npz", ".safetensors"):
        raise StateError(f"{path}: unknown state file suffix (use .npz or .safetensors)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **{_HEADER_KEY: np.array(json.dumps(header))}, **arrays)
        else:
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                      metadata={_META_KEY: json.dumps(header)})
    return path


@contextlib.contextmanager
def _open(path: pathlib.Path):
    """Yield (raw header or None, {name: shape}, {name: dtype}, read(name) -> array).

    Nothing but headers is read until ``read`` is called.
    """
    try:
        kind = file_kind(path)
    except FileNotFoundError:
        raise StateError(f"{path}: no such state file") from None
    except OSError as e:
        raise StateError(f"{path}: cannot read state file: {describe(e)}") from None
    if kind != "file":
        raise StateError(f"{path}: is a directory, not a state file")
    try:
        if path.suffix == ".safetensors":
            arrays, meta = read_safetensors(path)
            yield (meta.get(_META_KEY), {k: v.shape for k, v in arrays.items()},
                   {k: v.dtype for k, v in arrays.items()}, arrays.__getitem__)
            return
        with NpzReader(path) as z:
            shapes, dtypes = dict(z.shapes), dict(z.dtypes)
            raw = None
            if _HEADER_KEY in shapes:
                shape, dtype = shapes.pop(_HEADER_KEY), dtypes.pop(_HEADER_KEY)
                if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * _MAX_HEADER_CHARS:
                    raise StateError(f"{path}: bad state header: '{_HEADER_KEY}' is a "
                                     f"{dtype} array of shape {shape}, not a short string")
                raw = str(z.read(_HEADER_KEY))
            yield raw, shapes, dtypes, z.read
    except CheckpointError as e:  # the container readers' errors name the file and problem
        raise StateError(str(e)) from None


def _header_problems(header: Any) -> list[str]:
    """What is wrong with a parsed header's fields and types (format checked before)."""
    problems = []
    for key, kind in _HEADER_FIELDS.items():
        if key not in header:
            if key != "head_size":
                problems.append(f"'{key}' is missing")
            continue
        v = header[key]
        if kind is int and (type(v) is not int or v <= 0):
            problems.append(f"'{key}' must be a positive integer, got {v!r:.40}")
        elif kind is str and not isinstance(v, str):
            problems.append(f"'{key}' must be a string, got {v!r:.40}")
    return problems


def _parse_header(path: pathlib.Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise StateError(f"{path}: no rwkv-jax state header (not written by save_state?)")
    if len(raw) > _MAX_HEADER_CHARS:
        raise StateError(f"{path}: bad state header: {len(raw)} characters (at most "
                         f"{_MAX_HEADER_CHARS})")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise StateError(f"{path}: bad state header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise StateError(f"{path}: bad state header: a JSON {type(header).__name__}, not an "
                         "object")
    if header.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not an rwkv-jax state file (format "
                         f"{header.get('format')!r:.60})")
    version = header.get("format_version")
    if type(version) is not int or version != STATE_FORMAT_VERSION:
        raise StateError(f"{path}: state format version {version!r:.40}, this reader knows "
                         f"{STATE_FORMAT_VERSION}")
    if problems := _header_problems(header):
        raise StateError(f"{path}: bad state header:\n  " + "\n  ".join(problems))
    return header


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
    with _open(path) as (raw, shapes, dtypes, read):
        header = _parse_header(path, raw)
        batch = _check_fits(path, header, model, shapes, dtypes)
        arrays = {k: read(k) for k in shapes}
    if problem := nonfinite_summary(arrays, what="state array"):
        raise StateError(f"{path}: {problem}; refused (a state with NaN/inf poisons every "
                         "later token)")
    template = jax.eval_shape(lambda: model.init_state(batch))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[dotted_name(p)], jnp.float32) for p, _ in flat])


def _check_fits(path: pathlib.Path, header: dict[str, Any], model,
                shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> int:
    """The batch size, once the header, array names, shapes and dtypes fit ``model``."""
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
    batch = header["batch_size"]
    _validate(shapes, model, batch, str(path))
    bad = [f"{k}: dtype {dtypes[k]}, expected float32 (or another float dtype)" for k in shapes
           if dtypes[k].newbyteorder("=") not in _FLOAT_DTYPES]
    if bad:
        raise StateError(f"{path}: state arrays must be floats:\n  " + "\n  ".join(bad))
    return batch
