"""Checkpoints in and out: official ``.pth`` (read without torch), ``.safetensors``
(official, Hugging Face or flash-linear-attention names) and run directories.

The model's NNX parameter paths are the official keys, so conversion is a table of
renames (Hugging Face / flash-linear-attention <-> official) plus a check that collects every
mismatch (unknown, missing, wrong shape) into one :class:`CheckpointError`. The whole config
is inferred from the tensor shapes; what shapes cannot tell (``ln_x_eps``, dtypes, WKV form)
comes from keyword overrides.
"""

from __future__ import annotations

import os
import pathlib
import re
import struct
import weakref
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import versions
from rwkv_jax.config import ConfigError, RWKVConfig
from rwkv_jax.io.files import atomic_path, describe, open_regular
from rwkv_jax.io.finite import nonfinite_summary
from rwkv_jax.io.pth import CheckpointError, read_pth, verify_pth, write_pth
from rwkv_jax.io.safetensors import read_safetensors
from rwkv_jax.model.functional import dotted_name
from rwkv_jax.model.lm import RWKV, abstract_model
from rwkv_jax.rundir import RunDir, path_kind

__all__ = ["CheckpointError", "load", "load_tokenizer", "save", "source_path", "verify", "read_tensors", "infer_config",
           "model_from_tensors", "model_tensors", "to_official_names", "to_hf_names",
           "to_fla_names"]

PathLike = str | os.PathLike

# ---- names -------------------------------------------------------------------------------
def to_official_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Rename Hugging Face (RWKV-4/5/6) or flash-linear-attention (RWKV-6/7) keys to the
    official ones, undoing their layout changes; official keys pass unchanged. The name maps
    are the versions' own (:mod:`rwkv_jax.versions`); each recognises its keys."""
    keys = set(tensors)
    for m in versions.name_maps():
        if m.recognise(keys):
            return m.to_official(tensors)
    return dict(tensors)


def _names_for(version: str, style: str):
    spec = versions.spec(version)
    if style not in spec.names:
        having = " and ".join(f"RWKV-{v}" for v, s in sorted(versions.REGISTRY.items())
                              if style in s.names)
        others = " or ".join(repr(n) for n in ("official", *sorted(spec.names)))
        raise ValueError(f"{spec.title} has no {style!r} names (only {having} have them); "
                         f"use names={others}")
    return spec.names[style]


def to_hf_names(tensors: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Rename official keys to the Hugging Face ecosystem's names: transformers'
    ``RwkvForCausalLM`` for RWKV-4, the HF remote-code layout of the RWKV-5/6 World models,
    flash-linear-attention's for RWKV-7 (as :func:`to_fla_names`)."""
    return _names_for(version, "hf").from_official(tensors)


def to_fla_names(tensors: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Rename official keys to flash-linear-attention's (``fla.models`` RWKV6/RWKV7ForCausalLM,
    as its ``utils/convert_from_rwkv{6,7}.py`` write them), with its layout changes (re-ordered
    and transposed LoRA matrices, stacked or squeezed vectors). FLA has only RWKV-6 and -7."""
    return _names_for(version, "fla").from_official(tensors)


# ---- reading -----------------------------------------------------------------------------
def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < (1 << 30) and head[8:9] == b"{"


def _format(file: pathlib.Path) -> str:
    """"pth" or "safetensors", by content (not by suffix)."""
    try:
        with open_regular(file) as f:
            head = f.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {describe(e)}") from None
    if head[:4] == b"PK\x03\x04":
        return "pth"
    if _looks_like_safetensors(head):
        return "safetensors"
    if not head:
        raise CheckpointError(f"{file}: file is empty")
    raise CheckpointError(f"{file}: not an RWKV checkpoint (neither a zip-format .pth nor "
                          f".safetensors; first bytes {head[:8]!r})")


def read_tensors(path: PathLike, *, verify: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy arrays, by content (not by file suffix).

    Accepts an official/torch ``.pth`` (zip), a ``.safetensors`` file, or a directory
    holding ``model.safetensors`` (a run directory); anything but a regular file or a
    directory (a FIFO, socket, device) is refused without blocking. Tensors are memory-mapped
    views. ``verify`` also checks a ``.pth``'s CRCs (a ``.safetensors`` header is always
    checked against the file). Raises :class:`CheckpointError` naming the file and problem.
    """
    file = RunDir(path).checkpoint_file()
    if _format(file) == "pth":
        return read_pth(file, verify=verify)
    return read_safetensors(file)[0]


# ---- config inference --------------------------------------------------------------------
def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in np.shape(v)) for k, v in tensors.items()}


def detect_version(tensors: Mapping[str, Any]) -> str:
    """The RWKV version from the keys (the rules of the official ``rwkv`` package, declared
    by each version module)."""
    keys = set(tensors)
    if "emb.weight" not in keys:
        sample = ", ".join(sorted(keys)[:8])
        raise CheckpointError(f"not an RWKV checkpoint: no 'emb.weight' (keys: {sample}"
                              f"{', ...' if len(keys) > 8 else ''})")
    return versions.detect(_shapes(tensors)).version


def _layer_count(tensors: Mapping[str, Any]) -> int:
    """The number of layers: the ``blocks.N.`` indices must run 0..L-1 without gaps.

    Each index is bounded by the number of tensors before it is used, so a key like
    ``blocks.100000000.att.key.weight`` is named in an error instead of building 10^8 layers.
    """
    layers: dict[int, str] = {}
    for key in tensors:
        if m := re.match(r"blocks\.(\d+)\.", key):
            digits = m.group(1)
            if len(digits) > 9 or int(digits) >= len(tensors):
                raise CheckpointError(
                    f"key '{key:.120}' names layer {digits:.20}, but the checkpoint holds only "
                    f"{len(tensors)} tensors (layer indices must run from 0 without gaps)")
            layers.setdefault(int(digits), key)
    if not layers:
        raise CheckpointError("not an RWKV checkpoint: no 'blocks.N.*' tensors")
    last = max(layers)
    if last != len(layers) - 1:
        missing = sorted(set(range(last + 1)) - set(layers))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise CheckpointError(
            f"key '{layers[last]:.120}' names layer {last}, but layers {shown} have no tensors "
            "(layer indices must run from 0 without gaps)")
    return len(layers)


def infer_config(tensors: Mapping[str, Any], **overrides: Any) -> RWKVConfig:
    """Infer a full :class:`RWKVConfig` from official-named tensors, then apply overrides.

    V, C, L and F come from ``emb.weight``, the block indices and ``blocks.0.ffn.key``; the
    version's own fields (head size, LoRA ranks) from its ``SPEC.infer``."""
    spec = versions.spec(detect_version(tensors))
    shapes = _shapes(tensors)
    emb = shapes["emb.weight"]
    if len(emb) != 2 or 0 in emb:
        raise CheckpointError(f"tensor 'emb.weight' has shape {emb}, expected 2-D "
                              "[vocab_size, n_embd] (malformed)")
    V, C = emb
    fields: dict[str, Any] = dict(version=spec.version, vocab_size=V, n_embd=C,
                                  n_layer=_layer_count(tensors))
    ffn_key = shapes.get("blocks.0.ffn.key.weight")
    if ffn_key is not None:
        if len(ffn_key) != 2 or 0 in ffn_key:
            raise CheckpointError(f"tensor 'blocks.0.ffn.key.weight' has shape {ffn_key}, "
                                  "expected 2-D [ffn_dim, n_embd] (malformed)")
        fields["ffn_dim"] = ffn_key[0]
    fields.update(spec.infer(shapes))
    missing = sorted(k for k, v in fields.items() if v is None)
    if missing:
        raise CheckpointError(f"not a complete {spec.title} checkpoint: cannot infer "
                              f"{', '.join(missing)} from the tensor shapes")
    try:
        return RWKVConfig(**fields).replace(**overrides)
    except ConfigError as e:
        raise CheckpointError(f"cannot build a config from this checkpoint: {e}") from None


# ---- tensors <-> model -------------------------------------------------------------------
def model_tensors(model: RWKV) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under their official keys."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {dotted_name(path): np.asarray(var[...]) for path, var in flat}


_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                 np.dtype(jnp.bfloat16)}


def _official(tensors: Mapping[str, Any], overrides: Mapping[str, Any]):
    """(official-named tensors, inferred config): the tensors a model of ``cfg`` takes."""
    tensors = to_official_names(tensors)
    cfg = infer_config(tensors, **overrides)
    tensors = cfg.spec.drop_unused(tensors)
    return tensors, cfg


def _mismatches(tensors: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Every unknown, missing, wrongly shaped or non-float key, one line per kind/key."""
    problems = []
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    for k in sorted(set(expected) & set(tensors)):
        want, got = tuple(expected[k].get_value().shape), tuple(tensors[k].shape)
        if want != got:
            problems.append(f"{k}: shape {got}, expected {want}")
        elif np.dtype(tensors[k].dtype).newbyteorder("=") not in _FLOAT_DTYPES:
            problems.append(f"{k}: dtype {tensors[k].dtype}, expected a float dtype")
    return problems


def _mismatch_error(cfg: RWKVConfig, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"checkpoint does not match an {cfg.spec.title} model "
                           f"(L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}):\n  "
                           + "\n  ".join(problems))


def model_from_tensors(tensors: Mapping[str, Any], **overrides: Any) -> RWKV:
    """Build a model from official- or HF-named tensors; config inferred from shapes.

    Every unknown, missing, wrongly shaped or non-float key is collected into one
    CheckpointError.
    """
    tensors, cfg = _official(tensors, overrides)
    abstract = abstract_model(cfg)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    expected = {dotted_name(p): v for p, v in nnx.to_flat_state(params)}
    if problems := _mismatches(tensors, expected):
        raise _mismatch_error(cfg, problems)
    pd = cfg.param_jnp_dtype
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(np.asarray(tensors[dotted_name(path)]), dtype=pd))
    return nnx.merge(graphdef, params, rest)


def _with_run_config(path: pathlib.Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of what a run directory's config.json fixes."""
    if "version" in overrides or path_kind(path) != "dir":
        return dict(overrides)
    return {**RunDir(path).config_overrides(), **overrides}


def load(path: PathLike, *, verify: bool = False, allow_nonfinite: bool = False,
         lora: PathLike | None = None, **overrides: Any) -> RWKV:
    """Load an official ``.pth``, a ``.safetensors`` (official, HF or FLA names) or a run
    directory.

    ``overrides`` set config fields that shapes cannot tell, e.g. ``ln_x_eps=1e-5``,
    ``compute_dtype="bfloat16"``, ``wkv_impl="associative"``. Unknown names raise.

    Loading options (not config fields): ``verify=True`` checks every CRC of a ``.pth``
    first (a full read of the file; see :func:`verify` for a report instead of an error);
    weights holding NaN/inf are refused unless ``allow_nonfinite=True``; ``lora=FILE``
    applies the adapters of a ``lora.safetensors`` (what a LoRA fine-tune writes) without
    merging them (:func:`rwkv_jax.lora.apply`: a warning when they were trained on a file
    with another sha256, an error naming every key that fits no weight).
    """
    path = pathlib.Path(path)
    overrides = _with_run_config(path, overrides)
    file = RunDir(path).checkpoint_file()
    tensors = read_tensors(file, verify=verify)
    if not allow_nonfinite and (problem := nonfinite_summary(tensors)):
        raise CheckpointError(f"{file}: {problem} (pass allow_nonfinite=True to load it "
                              "anyway)")
    try:
        model = model_from_tensors(tensors, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if lora is not None:
        from rwkv_jax import lora as lora_lib
        lora_lib.apply(model, lora, base=file)
    _sources[model] = path
    return model


# model -> the path it was loaded from (for load_tokenizer; not a module attribute, which
# would make models from different files compile separately)
_sources: "weakref.WeakKeyDictionary[RWKV, pathlib.Path]" = weakref.WeakKeyDictionary()


def source_path(model) -> pathlib.Path | None:
    """The file or run directory :func:`load` read ``model`` from (None if it did not)."""
    return _sources.get(model)


def load_tokenizer(source, spec: str | None = None):
    """The tokenizer that goes with ``source``: a model (from :func:`load`, or any: then by
    its vocabulary size), a run directory (its ``tokenizer.json``) or a checkpoint file
    (by vocabulary size: 256 -> bytes, 65536 -> World). ``spec`` overrides it, as
    ``--tokenizer`` does. The one resolver is :func:`rwkv_jax.tokenizers.resolve_tokenizer`."""
    from rwkv_jax.tokenizers import resolve_tokenizer
    if isinstance(source, RWKV):
        return resolve_tokenizer(spec, model_path=source_path(source),
                                 vocab_size=source.config.vocab_size)
    path = pathlib.Path(source)
    run = RunDir(path)
    if path_kind(path) == "dir" and (path / RunDir.TOKENIZER).is_file():
        return resolve_tokenizer(spec, model_path=path)
    emb = read_tensors(run.checkpoint_file()).get("emb.weight")
    vocab = None if emb is None else int(np.shape(emb)[0])
    return resolve_tokenizer(spec, model_path=path, vocab_size=vocab)


def verify(path: PathLike, **overrides: Any) -> list[str]:
    """Check a checkpoint without building a model; the problems found, ``[]`` if none.

    Checks, each reported as one line naming the file: a run directory's config.json; a
    ``.pth``'s zip-member CRCs (one streaming read of the file) and a ``.safetensors``'s
    header against the file; that every tensor reads (bounds, dtypes, geometry); NaN/inf
    values; and that the tensors are the keys and shapes of an RWKV model (``overrides`` as
    for :func:`load`). Does not raise :class:`CheckpointError`: a file that cannot be read at
    all is reported as one problem.
    """
    path = pathlib.Path(path)
    try:
        file = RunDir(path).checkpoint_file()
    except CheckpointError as e:
        return [str(e)]
    problems = []
    try:
        overrides = _with_run_config(path, overrides)
    except CheckpointError as e:
        problems.append(str(e))
    try:
        if _format(file) == "pth":
            problems += [f"{file}: {p}" for p in verify_pth(file)]
        tensors = read_tensors(file)
    except CheckpointError as e:
        return [*problems, str(e)]
    if problem := nonfinite_summary(tensors):
        problems.append(f"{file}: {problem}")
    try:
        tensors, cfg = _official(tensors, overrides)
        abstract = abstract_model(cfg)
        expected = {dotted_name(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
        if mismatches := _mismatches(tensors, expected):
            problems.append(f"{file}: {_mismatch_error(cfg, mismatches)}")
    except CheckpointError as e:
        problems.append(f"{file}: {e}")
    return problems


def save(model: RWKV, path: PathLike, *, names: str = "official") -> pathlib.Path:
    """Write the model's parameters to ``path``: ``.safetensors`` or ``.pth`` by suffix.

    ``names``: "official" (BlinkDL keys; what the official ``rwkv`` package loads), "hf"
    (Hugging Face names: transformers / HF remote code for RWKV-4/5/6, flash-linear-attention
    for RWKV-7; see :func:`to_hf_names`) or "fla" (flash-linear-attention names, RWKV-6 and
    RWKV-7 only; see :func:`to_fla_names`). :func:`load` reads all of them back.
    """
    path = pathlib.Path(path)
    tensors = model_tensors(model)
    if names in ("hf", "fla"):
        tensors = _names_for(model.config.version, names).from_official(tensors)
    elif names != "official":
        raise ValueError(f"names must be 'official', 'hf' or 'fla', got {names!r}")
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"{path}: unknown checkpoint suffix (use .safetensors or .pth)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pth":
        write_pth(tensors, path)  # atomic itself
        return path
    from safetensors.numpy import save_file
    with atomic_path(path) as tmp:  # a crash never leaves a half-written checkpoint
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", "rwkv_version": model.config.version})
    return path
