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
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import versions
from rwkv_jax.config import ConfigError, RWKVConfig
from rwkv_jax.io.pth import CheckpointError, read_pth, write_pth
from rwkv_jax.model.lm import RWKV
from rwkv_jax.rundir import RunDir

__all__ = ["CheckpointError", "load", "save", "read_tensors", "infer_config",
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
        have = ", ".join(sorted(spec.names)) or "none"
        raise ValueError(f"{spec.title} has no {style!r} names (it has: {have}); use "
                         f"names='official'" + (" or 'hf'" if "hf" in spec.names else ""))
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
def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < (1 << 30) and head[8:9] == b"{"


def read_tensors(path: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy arrays, by content (not by file suffix).

    Accepts an official/torch ``.pth`` (zip), a ``.safetensors`` file, or a directory
    holding ``model.safetensors`` (a run directory). Raises :class:`CheckpointError`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        return read_tensors(RunDir(path).model_file())
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return read_pth(path)
    if _looks_like_safetensors(head):
        return _read_safetensors(path)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    raise CheckpointError(f"{path}: not an RWKV checkpoint (neither a zip-format .pth nor "
                          f".safetensors; first bytes {head[:8]!r})")


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


def infer_config(tensors: Mapping[str, Any], **overrides: Any) -> RWKVConfig:
    """Infer a full :class:`RWKVConfig` from official-named tensors, then apply overrides.

    V, C, L and F come from ``emb.weight``, the block indices and ``blocks.0.ffn.key``; the
    version's own fields (head size, LoRA ranks) from its ``SPEC.infer``."""
    spec = versions.spec(detect_version(tensors))
    shapes = _shapes(tensors)
    emb = shapes["emb.weight"]
    if len(emb) != 2:
        raise CheckpointError(f"emb.weight: expected a [vocab, n_embd] matrix, got shape {emb}")
    V, C = emb
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError("not an RWKV checkpoint: no 'blocks.N.*' tensors")
    fields: dict[str, Any] = dict(version=spec.version, vocab_size=int(V), n_embd=int(C),
                                  n_layer=max(layers) + 1)
    ffn_key = shapes.get("blocks.0.ffn.key.weight")
    if ffn_key is not None and ffn_key:
        fields["ffn_dim"] = int(ffn_key[0])
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
def _key(path) -> str:
    return ".".join(str(p) for p in path)


def model_tensors(model: RWKV) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under their official keys."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {_key(path): np.asarray(var[...]) for path, var in flat}


def model_from_tensors(tensors: Mapping[str, Any], **overrides: Any) -> RWKV:
    """Build a model from official- or HF-named tensors; config inferred from shapes.

    Every unknown, missing or wrongly shaped key is collected into one CheckpointError.
    """
    tensors = to_official_names(tensors)
    cfg = infer_config(tensors, **overrides)
    tensors = cfg.spec.drop_unused(tensors)
    abstract = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    expected = {_key(p): v for p, v in nnx.to_flat_state(params)}
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
    if problems:
        raise CheckpointError(f"checkpoint does not match an {cfg.spec.title} model "
                              f"(L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}):\n  "
                              + "\n  ".join(problems))
    pd = cfg.param_jnp_dtype
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(np.asarray(tensors[_key(path)]), dtype=pd))
    return nnx.merge(graphdef, params, rest)


def load(path: PathLike, **overrides: Any) -> RWKV:
    """Load an official ``.pth``, a ``.safetensors`` (official, HF or FLA names) or a run
    directory.

    ``overrides`` set config fields that shapes cannot tell, e.g. ``ln_x_eps=1e-5``,
    ``compute_dtype="bfloat16"``, ``wkv_impl="associative"``. Unknown names raise.
    """
    path = pathlib.Path(path)
    if path.is_dir() and "version" not in overrides:
        overrides = {**RunDir(path).config_overrides(), **overrides}
    tensors = read_tensors(path)
    try:
        return model_from_tensors(tensors, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", "rwkv_version": model.config.version})
    elif path.suffix == ".pth":
        write_pth(tensors, tmp)
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix (use .safetensors or .pth)")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    return path
