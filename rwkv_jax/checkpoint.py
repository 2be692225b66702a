"""Checkpoints in and out: official ``.pth`` (read without torch), ``.safetensors``
(official, Hugging Face or flash-linear-attention names) and run directories.

The model's NNX parameter paths are the official keys, so conversion is a table of
renames (Hugging Face / flash-linear-attention <-> official) plus a check that collects every
mismatch (unknown, missing, wrong shape) into one :class:`CheckpointError`. The whole config
is inferred from the tensor shapes; what shapes cannot tell (``ln_x_eps``, dtypes, WKV form)
comes from keyword overrides.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import ConfigError, RWKVConfig
from rwkv_jax.io.files import describe, file_kind, open_regular, read_small
from rwkv_jax.io.finite import nonfinite_summary
from rwkv_jax.io.pth import CheckpointError, read_pth, verify_pth, write_pth
from rwkv_jax.io.safetensors import read_safetensors
from rwkv_jax.model.lm import RWKV

__all__ = ["CheckpointError", "load", "save", "verify", "read_tensors", "infer_config",
           "model_from_tensors", "model_tensors", "to_official_names", "to_hf_names",
           "to_fla_names"]

PathLike = str | os.PathLike

# ---- names -------------------------------------------------------------------------------
# Hugging Face transformers RwkvForCausalLM (RWKV-4) <-> official, per dotted key; the HF
# remote-code RWKV-5/6 models use the same prefixes (their time_mix/maa names are official)
# (reference §2.3: everything but head.weight gains the "rwkv." prefix).
_HF_RWKV4 = [
    (r"^emb\.", "rwkv.embeddings."),
    (r"^blocks\.0\.ln0\.", "rwkv.blocks.0.pre_ln."),
    (r"^blocks\.(\d+)\.att\.time_mix_k$", r"rwkv.blocks.\1.attention.time_mix_key"),
    (r"^blocks\.(\d+)\.att\.time_mix_v$", r"rwkv.blocks.\1.attention.time_mix_value"),
    (r"^blocks\.(\d+)\.att\.time_mix_r$", r"rwkv.blocks.\1.attention.time_mix_receptance"),
    (r"^blocks\.(\d+)\.ffn\.time_mix_k$", r"rwkv.blocks.\1.feed_forward.time_mix_key"),
    (r"^blocks\.(\d+)\.ffn\.time_mix_r$", r"rwkv.blocks.\1.feed_forward.time_mix_receptance"),
    (r"^blocks\.(\d+)\.att\.", r"rwkv.blocks.\1.attention."),
    (r"^blocks\.(\d+)\.ffn\.", r"rwkv.blocks.\1.feed_forward."),
    (r"^blocks\.", "rwkv.blocks."),
    (r"^ln_out\.", "rwkv.ln_out."),
]
_HF_RWKV4_BACK = [
    (r"^rwkv\.embeddings\.", "emb."),
    (r"^rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_key$", r"blocks.\1.att.time_mix_k"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_value$", r"blocks.\1.att.time_mix_v"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_receptance$", r"blocks.\1.att.time_mix_r"),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_key$", r"blocks.\1.ffn.time_mix_k"),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_receptance$", r"blocks.\1.ffn.time_mix_r"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.", r"blocks.\1.att."),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn."),
    (r"^rwkv\.blocks\.", "blocks."),
    (r"^rwkv\.ln_out\.", "ln_out."),
]


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# flash-linear-attention RWKV-7 (its utils/convert_from_rwkv7.py, reference §5.2):
# layer parts renamed, LoRA x1/x2 stored transposed as lora.0/lora.2 weights, x0 as the
# lora.2 bias, and [1, 1, C] vectors squeezed to [C] except attn.x_*.
_FLA7_PARTS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn",
               "ffn": "ffn"}
_FLA7_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
              "ln_x": "g_norm"}
_FLA7_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
             "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_FLA7_PARTS_BACK = {v: k for k, v in _FLA7_PARTS.items()}
_FLA7_PROJ_BACK = {v: k for k, v in _FLA7_PROJ.items()}
_FLA7_TOP_BACK = {v: k for k, v in _FLA7_TOP.items()}


def _official_to_fla7(key: str, value):
    if key in _FLA7_TOP:
        return _FLA7_TOP[key], value
    _, i, part, name, *rest = key.split(".")
    transpose = False
    if m := re.fullmatch(r"([wavg])([012])", name):
        name = f"{m.group(1)}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[
            m.group(2)]
        transpose = m.group(2) != "0"
    elif part == "att" and name in _FLA7_PROJ:
        name = _FLA7_PROJ[name]
    value = np.asarray(value)
    if transpose:
        value = value.T
    elif value.ndim == 3 and value.shape[:2] == (1, 1) and not (part == "att"
                                                                  and name.startswith("x_")):
        value = value.reshape(-1)
    return ".".join(["model.layers", i, _FLA7_PARTS[part], name, *rest]), value


def _fla7_to_official(key: str, value):
    if key in _FLA7_TOP_BACK:
        return _FLA7_TOP_BACK[key], value
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key)
    if not m:
        return key, value
    i, part, rest = m.groups()
    part = _FLA7_PARTS_BACK.get(part, part)
    value = np.asarray(value)
    if lm := re.fullmatch(r"([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)", rest):
        n = {"2.bias": "0", "0.weight": "1", "2.weight": "2"}[lm.group(2)]
        rest = lm.group(1) + n
        value = value.reshape(1, 1, -1) if n == "0" else value.T
    else:
        head, *tail = rest.split(".")
        rest = ".".join([_FLA7_PROJ_BACK.get(head, head), *tail])
        if value.ndim == 1 and rest in ("k_k", "k_a", "x_k"):
            value = value.reshape(1, 1, -1)
    return f"blocks.{i}.{part}.{rest}", value


# flash-linear-attention RWKV-6 (its utils/convert_from_rwkv6.py and fla/layers/rwkv6.py at
# commit bc3b101dcb71, reference §4.2). FLA orders the five ddlerp mixes (r, w, k, v, g); the
# official x060 code orders them (w, k, v, r, g). time_maa_w1 [C, 5*D] becomes
# x_proj.0.linear.weight [5*D, C] (column blocks re-ordered, then transposed); time_maa_w2
# [5, D, C] becomes x_proj.2.weight [C, 5*D] (first axis re-ordered, flattened, transposed);
# the five time_maa_{r,w,k,v,g} [1,1,C] are stacked into x_bias [5, C]; the other
# [1, 1, C] vectors are squeezed to [C]; time_decay_w1/w2 are stored transposed.
_FLA6_MIX = "rwkvg"  # FLA's order of the mixes (x_proj output blocks, x_bias rows)
_OFFICIAL6_MIX = "wkvrg"  # official order (time_maa_w1 column blocks, time_maa_w2 rows)
_FLA6_PERM = [_OFFICIAL6_MIX.index(c) for c in _FLA6_MIX]  # official block of FLA block n
_FLA6_PERM_BACK = [_FLA6_MIX.index(c) for c in _OFFICIAL6_MIX]
# official key after "blocks.N." -> (FLA key after "model.layers.N.", layout transform)
_FLA6 = {
    "ln0.weight": ("pre_norm.weight", None), "ln0.bias": ("pre_norm.bias", None),
    "ln1.weight": ("attn_norm.weight", None), "ln1.bias": ("attn_norm.bias", None),
    "ln2.weight": ("ffn_norm.weight", None), "ln2.bias": ("ffn_norm.bias", None),
    "att.time_maa_x": ("attn.x_proj.0.mu", "squeeze"),
    "att.time_maa_w1": ("attn.x_proj.0.linear.weight", "maa_w1"),
    "att.time_maa_w2": ("attn.x_proj.2.weight", "maa_w2"),
    "att.time_decay": ("attn.w_proj.linear.lora.2.bias", "squeeze"),
    "att.time_decay_w1": ("attn.w_proj.linear.lora.0.weight", "transpose"),
    "att.time_decay_w2": ("attn.w_proj.linear.lora.2.weight", "transpose"),
    "att.time_faaaa": ("attn.bonus", None),
    "att.receptance.weight": ("attn.r_proj.linear.weight", None),
    "att.key.weight": ("attn.k_proj.linear.weight", None),
    "att.value.weight": ("attn.v_proj.linear.weight", None),
    "att.gate.weight": ("attn.g_proj.linear.weight", None),
    "att.output.weight": ("attn.o_proj.weight", None),
    "att.ln_x.weight": ("attn.g_norm.weight", None),
    "att.ln_x.bias": ("attn.g_norm.bias", None),
    "ffn.time_maa_k": ("ffn.key.mu", "squeeze"),
    "ffn.time_maa_r": ("ffn.receptance.mu", "squeeze"),
    "ffn.key.weight": ("ffn.key.linear.weight", None),
    "ffn.receptance.weight": ("ffn.receptance.linear.weight", None),
    "ffn.value.weight": ("ffn.value.weight", None),
}
_FLA6_BACK = {fla: (official, how) for official, (fla, how) in _FLA6.items()}
_FLA6_BIAS = "attn.x_bias"  # stack of att.time_maa_{r,w,k,v,g}
_FLA6_MARK = re.compile(r"model\.layers\.\d+\.attn\.(x_bias$|bonus$|x_proj\.|w_proj\.)")


def _fla6_value(value, how: str | None, back: bool):
    """One tensor's layout change (``back``: FLA -> official). A tensor whose shape the
    change does not fit passes unchanged, so the model's shape check reports it."""
    value = np.asarray(value)
    shape = value.shape
    if how == "squeeze":  # official [1, 1, C] <-> FLA [C]
        if back:
            return value.reshape(1, 1, -1) if value.ndim == 1 else value
        return value.reshape(-1) if value.ndim == 3 and shape[:2] == (1, 1) else value
    if how == "transpose":
        return value.T if value.ndim == 2 else value
    if how == "maa_w1":  # official [C, 5*D] (blocks w,k,v,r,g) <-> FLA [5*D, C] (r,w,k,v,g)
        if value.ndim != 2 or shape[0 if back else 1] % 5:
            return value
        if back:
            c, m = shape[1], shape[0]
            return value.T.reshape(c, 5, m // 5)[:, _FLA6_PERM_BACK].reshape(c, m)
        c, m = shape
        return value.reshape(c, 5, m // 5)[:, _FLA6_PERM].reshape(c, m).T
    if how == "maa_w2":  # official [5, D, C] (w,k,v,r,g) <-> FLA [C, 5*D] (r,w,k,v,g)
        if back:
            if value.ndim != 2 or shape[1] % 5:
                return value
            c, m = shape
            return value.T.reshape(5, m // 5, c)[_FLA6_PERM_BACK]
        if value.ndim != 3 or shape[0] != 5:
            return value
        return value[_FLA6_PERM].reshape(-1, shape[2]).T
    return value


def _official_to_fla6(tensors: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mixes: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key in _FLA7_TOP:  # emb / ln_out / head: same names as FLA's RWKV-7
            out[_FLA7_TOP[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        if mix := re.fullmatch(r"att\.time_maa_([rwkvg])", rest):
            mixes.setdefault(i, {})[mix.group(1)] = value
        elif rest in _FLA6:
            name, how = _FLA6[rest]
            out[f"model.layers.{i}.{name}"] = _fla6_value(value, how, back=False)
        else:
            out[key] = value
    for i, mix in mixes.items():
        rows = [np.asarray(mix.get(c, ())).reshape(-1) for c in _FLA6_MIX]
        if len(mix) == 5 and len({r.shape for r in rows}) == 1:
            out[f"model.layers.{i}.{_FLA6_BIAS}"] = np.stack(rows)
        else:  # an incomplete or ragged set cannot be stacked: keep the official keys
            out.update({f"blocks.{i}.att.time_maa_{c}": v for c, v in mix.items()})
    return out


def _fla6_to_official(tensors: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key in _FLA7_TOP_BACK:
            out[_FLA7_TOP_BACK[key]] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        value = np.asarray(value)
        if rest == _FLA6_BIAS and value.ndim == 2 and len(value) == 5:
            for c, row in zip(_FLA6_MIX, value):
                out[f"blocks.{i}.att.time_maa_{c}"] = row.reshape(1, 1, -1)
        elif rest in _FLA6_BACK:
            name, how = _FLA6_BACK[rest]
            out[f"blocks.{i}.{name}"] = _fla6_value(value, how, back=True)
        else:  # unknown (or a misshapen x_bias): the model check lists it under its own name
            out[key] = value
    return out


def to_official_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Rename Hugging Face (RWKV-4/5/6) or flash-linear-attention (RWKV-6/7) keys to the
    official ones, undoing their layout changes; official keys pass unchanged."""
    if any(k.startswith("rwkv.") for k in tensors):
        return {_rename(k, _HF_RWKV4_BACK): v for k, v in tensors.items()}
    if any(k.startswith("model.layers.") for k in tensors):
        if any(_FLA6_MARK.match(k) for k in tensors):
            return _fla6_to_official(tensors)
        return dict(_fla7_to_official(k, v) for k, v in tensors.items())
    return dict(tensors)


def to_hf_names(tensors: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Rename official keys to the Hugging Face ecosystem's names: transformers'
    ``RwkvForCausalLM`` for RWKV-4; the HF remote-code layout of the RWKV-5/6 World models
    (the official names under ``rwkv.`` / ``attention`` / ``feed_forward`` / ``embeddings`` /
    ``pre_ln``, reference §4.2; the RWKV-4 ``time_mix_*`` renames match no v5/v6 key);
    flash-linear-attention's for RWKV-7 (as :func:`to_fla_names`)."""
    if version == "7":
        return to_fla_names(tensors, version)
    return {_rename(k, _HF_RWKV4): v for k, v in tensors.items()}


def to_fla_names(tensors: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Rename official keys to flash-linear-attention's (``fla.models`` RWKV6/RWKV7ForCausalLM,
    as its ``utils/convert_from_rwkv{6,7}.py`` write them), with its layout changes (re-ordered
    and transposed LoRA matrices, stacked or squeezed vectors). FLA has only RWKV-6 and -7."""
    if version == "6":
        return _official_to_fla6(tensors)
    if version == "7":
        return dict(_official_to_fla7(k, v) for k, v in tensors.items())
    raise ValueError(f"flash-linear-attention has no RWKV-{version} layout (only RWKV-6 and "
                     f"RWKV-7); use names='official' or 'hf'")


# ---- reading -----------------------------------------------------------------------------
_RUN_CONFIG_BYTES = 1 << 20  # a run directory's config.json is a few hundred bytes
# config.json fields that shapes cannot tell -> (kind, may be None)
_RUN_CONFIG_KEEP = {"ln_x_eps": (float, False), "ln_eps": (float, False),
                    "head_size": (int, False), "chunk_size": (int, True)}


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < (1 << 30) and head[8:9] == b"{"


def _kind(path: pathlib.Path) -> str:
    """"file" or "dir"; CheckpointError for a missing, unreadable or special file."""
    try:
        return file_kind(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:  # permission, FIFO / socket / device
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from None


def _exists(path: pathlib.Path) -> bool:
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # a directory we may not list
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from None


def _model_file(path: pathlib.Path) -> pathlib.Path:
    """The checkpoint file ``path`` names: itself, or a run directory's model file."""
    if _kind(path) == "dir":
        for name in ("model.safetensors", "model.pth"):
            if _exists(path / name):
                return path / name
        raise CheckpointError(f"{path}: directory holds no model.safetensors or model.pth")
    return path


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
    file = _model_file(pathlib.Path(path))
    if _format(file) == "pth":
        return read_pth(file, verify=verify)
    return read_safetensors(file)[0]


def _run_config(path: pathlib.Path) -> dict[str, Any]:
    """The config fields a run directory's config.json fixes (``{}`` for a plain file).

    Raises CheckpointError naming config.json when it is unreadable, not a JSON object, or
    holds a kept field of the wrong type.
    """
    cfg = path / "config.json"
    if _kind(path) != "dir" or not _exists(cfg):
        return {}
    try:
        saved = json.loads(read_small(cfg, _RUN_CONFIG_BYTES).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{cfg}: cannot read: {describe(e)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{cfg}: must hold a JSON object, got {type(saved).__name__}")
    kept = {}
    for key, (kind, nullable) in _RUN_CONFIG_KEEP.items():
        if key not in saved:
            continue
        v = saved[key]
        if v is None and nullable:
            kept[key] = None
            continue
        ok = (type(v) is int if kind is int else type(v) in (int, float) and math.isfinite(v))
        if not ok or v <= 0:
            raise CheckpointError(f"{cfg}: '{key}' must be a positive "
                                  f"{'integer' if kind is int else 'number'}, got {v!r:.60}")
        kept[key] = v
    return kept


# ---- config inference --------------------------------------------------------------------
def detect_version(tensors: Mapping[str, Any]) -> str:
    """The RWKV version from the keys (the rules of the official ``rwkv`` package)."""
    keys = set(tensors)
    if "emb.weight" not in keys:
        sample = ", ".join(sorted(keys)[:8])
        raise CheckpointError(f"not an RWKV checkpoint: no 'emb.weight' (keys: {sample}"
                              f"{', ...' if len(keys) > 8 else ''})")
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        return "7"
    if "blocks.0.att.time_maa_x" in keys:
        return "6"
    if "blocks.0.att.ln_x.weight" in keys:
        td = tensors.get("blocks.0.att.time_decay")
        if td is not None and len(td.shape) == 2 and td.shape[1] > 1:
            return "5.2"
        return "5.1"
    return "4"


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
    """Infer a full :class:`RWKVConfig` from official-named tensors, then apply overrides."""
    version = detect_version(tensors)

    def shape(key, axis):
        """Dimension ``axis`` of tensor ``key``; None when absent; raises when malformed."""
        t = tensors.get(key)
        if t is None:
            return None
        if len(t.shape) <= axis or t.shape[axis] == 0:
            raise CheckpointError(f"tensor '{key}' has shape {tuple(t.shape)}, which has no "
                                  f"non-zero dimension {axis} to read a size from (malformed)")
        return int(t.shape[axis])

    emb = tensors["emb.weight"]
    if len(emb.shape) != 2:
        raise CheckpointError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected "
                              "2-D [vocab_size, n_embd] (malformed)")
    V, C = shape("emb.weight", 0), shape("emb.weight", 1)
    fields: dict[str, Any] = dict(version=version, vocab_size=V, n_embd=C,
                                  n_layer=_layer_count(tensors))
    ffn_dim = shape("blocks.0.ffn.key.weight", 0)
    if ffn_dim is not None:
        fields["ffn_dim"] = ffn_dim

    att = "blocks.0.att."
    if version == "5.1":  # per-head decay [H]
        n_head = shape(att + "time_decay", 0)
        fields["head_size"] = C // n_head if n_head else None
    elif version in ("5.2", "6"):  # time_faaaa [H, N]
        fields["head_size"] = shape(att + "time_faaaa", 1)
    elif version == "7":  # r_k [H, N]
        fields["head_size"] = shape(att + "r_k", 1)
    if version == "6":
        d_mix = shape(att + "time_maa_w1", 1)
        fields.update(d_mix=d_mix // 5 if d_mix else None,
                      d_decay=shape(att + "time_decay_w1", 1))
    if version == "7":
        last = f"blocks.{fields['n_layer'] - 1}.att."  # layer 0 may lack v1/v2
        fields.update(d_decay=shape(att + "w1", 1), d_aaa=shape(att + "a1", 1),
                      d_gate=shape(att + "g1", 1), d_mv=shape(last + "v1", 1) or 32)
    missing = sorted(k for k, v in fields.items() if v is None)
    if missing:
        raise CheckpointError(f"not a complete RWKV-{version} checkpoint: cannot infer "
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


_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                 np.dtype(jnp.bfloat16)}


def _official(tensors: Mapping[str, Any], overrides: Mapping[str, Any]):
    """(official-named tensors, inferred config): the tensors a model of ``cfg`` takes."""
    tensors = to_official_names(tensors)
    cfg = infer_config(tensors, **overrides)
    if cfg.version == "7":  # layer 0 has no value residual; some checkpoints carry unused ones
        tensors = {k: v for k, v in tensors.items()
                   if not re.match(r"blocks\.0\.att\.v[012]$", k)}
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
    return CheckpointError(f"checkpoint does not match an RWKV-{cfg.version} model "
                           f"(L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}):\n  "
                           + "\n  ".join(problems))


def model_from_tensors(tensors: Mapping[str, Any], **overrides: Any) -> RWKV:
    """Build a model from official- or HF-named tensors; config inferred from shapes.

    Every unknown, missing, wrongly shaped or non-float key is collected into one
    CheckpointError.
    """
    tensors, cfg = _official(tensors, overrides)
    abstract = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    expected = {_key(p): v for p, v in nnx.to_flat_state(params)}
    if problems := _mismatches(tensors, expected):
        raise _mismatch_error(cfg, problems)
    pd = cfg.param_jnp_dtype
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(np.asarray(tensors[_key(path)]), dtype=pd))
    return nnx.merge(graphdef, params, rest)


def _with_run_config(path: pathlib.Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of what a run directory's config.json fixes."""
    if "version" in overrides:
        return dict(overrides)
    return {**_run_config(path), **overrides}


def load(path: PathLike, *, verify: bool = False, allow_nonfinite: bool = False,
         **overrides: Any) -> RWKV:
    """Load an official ``.pth``, a ``.safetensors`` (official, HF or FLA names) or a run
    directory.

    ``overrides`` set config fields that shapes cannot tell, e.g. ``ln_x_eps=1e-5``,
    ``compute_dtype="bfloat16"``, ``wkv_impl="associative"``. Unknown names raise.

    Loading options (not config fields): ``verify=True`` checks every CRC of a ``.pth``
    first (a full read of the file; see :func:`verify` for a report instead of an error);
    weights holding NaN/inf are refused unless ``allow_nonfinite=True``.
    """
    path = pathlib.Path(path)
    overrides = _with_run_config(path, overrides)
    file = _model_file(path)
    tensors = read_tensors(file, verify=verify)
    if not allow_nonfinite and (problem := nonfinite_summary(tensors)):
        raise CheckpointError(f"{file}: {problem} (pass allow_nonfinite=True to load it "
                              "anyway)")
    try:
        return model_from_tensors(tensors, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


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
        file = _model_file(path)
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
        abstract = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
        expected = {_key(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
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
    if names == "hf":
        tensors = to_hf_names(tensors, model.config.version)
    elif names == "fla":
        tensors = to_fla_names(tensors, model.config.version)
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
