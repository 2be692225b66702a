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
import os
import pathlib
import re
import struct
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.config import ConfigError, RWKVConfig
from rwkv_jax.io.pth import CheckpointError, read_pth, write_pth
from rwkv_jax.model.lm import RWKV

__all__ = ["CheckpointError", "load", "save", "read_tensors", "infer_config",
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
        for name in ("model.safetensors", "model.pth"):
            if (path / name).exists():
                return read_tensors(path / name)
        raise CheckpointError(f"{path}: directory holds no model.safetensors or model.pth")
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


def infer_config(tensors: Mapping[str, Any], **overrides: Any) -> RWKVConfig:
    """Infer a full :class:`RWKVConfig` from official-named tensors, then apply overrides."""
    version = detect_version(tensors)
    V, C = tensors["emb.weight"].shape
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError("not an RWKV checkpoint: no 'blocks.N.*' tensors")
    fields: dict[str, Any] = dict(version=version, vocab_size=int(V), n_embd=int(C),
                                  n_layer=max(layers) + 1)
    ffn_key = tensors.get("blocks.0.ffn.key.weight")
    if ffn_key is not None:
        fields["ffn_dim"] = int(ffn_key.shape[0])

    def shape(key, axis):
        t = tensors.get(key)
        return None if t is None or len(t.shape) <= axis else int(t.shape[axis])

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


def model_from_tensors(tensors: Mapping[str, Any], **overrides: Any) -> RWKV:
    """Build a model from official- or HF-named tensors; config inferred from shapes.

    Every unknown, missing or wrongly shaped key is collected into one CheckpointError.
    """
    tensors = to_official_names(tensors)
    cfg = infer_config(tensors, **overrides)
    if cfg.version == "7":  # layer 0 has no value residual; some checkpoints carry unused ones
        tensors = {k: v for k, v in tensors.items()
                   if not re.match(r"blocks\.0\.att\.v[012]$", k)}
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
        raise CheckpointError(f"checkpoint does not match an RWKV-{cfg.version} model "
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
    if path.is_dir() and (path / "config.json").exists() and "version" not in overrides:
        saved = json.loads((path / "config.json").read_text())
        keep = ("ln_x_eps", "ln_eps", "head_size", "chunk_size")
        overrides = {**{k: saved[k] for k in keep if k in saved}, **overrides}
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
