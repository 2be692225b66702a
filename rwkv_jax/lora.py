"""LoRA adapters on a model's Linear weights: attach, merge, save and load.

An adapter on the Linear whose official weight is ``N.weight`` [out, in] adds
``scale · (drop(x) @ A.T) @ B.T`` to its output, with ``A = N.lora_A`` [r, in],
``B = N.lora_B`` [out, r] and ``scale = alpha / r`` (RWKV-PEFT's ``LoraLinear``, its
shapes and names). A fresh adapter has ``A`` kaiming-uniform (torch's Linear init, which
PEFT uses: U(±1/sqrt(in))) and ``B = 0``, so it changes nothing until trained. Merging
replaces ``W`` by ``W + scale · B @ A`` (float32) and drops the adapter.

``lora.safetensors`` (what a LoRA run writes; :func:`save` / :func:`apply`) holds the
adapters, the parameters trained in full alongside them (``finetune.train_also``) under
their official names, and metadata (strings, as safetensors requires)::

    format: rwkv-jax-lora    format_version: 1    rwkv_version: "7"
    rank, alpha, dropout     targets: JSON list of the regexes adapted
    base_name, base_path, base_sha256: the checkpoint file the adapters were trained on
    trained_in_full: JSON list of the full parameters included

``rwkv_jax.load(base, lora="run/lora.safetensors")`` applies such a file without merging.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.io.errors import CheckpointError
from rwkv_jax.io.files import atomic_path, describe, open_regular
from rwkv_jax.io.finite import nonfinite_summary
from rwkv_jax.io.safetensors import read_safetensors
from rwkv_jax.model.functional import dotted_name
from rwkv_jax.model.layers import Linear, LoRAParam

__all__ = ["LORA_FORMAT", "LORA_FORMAT_VERSION", "LoRAParam", "adapted", "apply", "attach",
           "default_targets", "file_sha256", "linears", "merge", "merged_tensors", "read",
           "save"]

LORA_FORMAT = "rwkv-jax-lora"
LORA_FORMAT_VERSION = 1
PathLike = str | os.PathLike


def default_targets(version: str) -> tuple[str, ...]:
    """The version's ``SPEC.lora_targets``: its time-mix and channel-mix projections."""
    from rwkv_jax import versions
    return versions.spec(version).lora_targets


def linears(model) -> dict[str, Linear]:
    """Every :class:`Linear` of ``model`` by the official name of its weight
    (``blocks.0.att.key.weight``), in the model's order."""
    return {dotted_name((*path, "weight")): m for path, m in nnx.iter_modules(model)
            if isinstance(m, Linear)}


def adapted(model) -> dict[str, Linear]:
    """The Linears of ``model`` that carry an adapter, by weight name."""
    return {n: m for n, m in linears(model).items() if m.lora_A is not None}


def _prefix(weight_name: str) -> str:
    return weight_name[:-len(".weight")]


def _select(names: Sequence[str], patterns: Sequence[str], what: str,
            others: Sequence[str] = ()) -> list[str]:
    """``names`` matching any of ``patterns`` (full match); ValueError naming a pattern that
    matches none of them (and saying so when it matches one of ``others`` instead)."""
    chosen = set()
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{p!r} is not a valid regex ({e})") from None
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            near = [n for n in others if rx.fullmatch(n)]
            hint = (f" (it matches {near[0]}, which is not a {what})" if near
                    else f"; e.g. {', '.join(list(names)[:3])}")
            raise ValueError(f"{p!r} matches no {what} of this model{hint}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def attach(model, *, rank: int, alpha: float, targets: Sequence[str] | None = None,
           dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Attach a fresh adapter (``A`` random, ``B = 0``: the model's output is unchanged) to
    every Linear whose weight name fully matches one of ``targets`` (regexes; default
    :func:`default_targets`). In place; returns the adapted weight names.

    Adapters are float32 whatever the model's ``param_dtype``. ValueError naming a target
    that matches no Linear weight, or when the model already has adapters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if adapted(model):
        raise ValueError("the model already has LoRA adapters (merge them first)")
    lins = linears(model)
    targets = default_targets(model.config.version) if targets is None else tuple(targets)
    params = [dotted_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    chosen = _select(list(lins), targets, "Linear weight", params)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(chosen):
        lin = lins[name]
        d_out, d_in = lin.weight.shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), torch's Linear init
        _set_adapter(lin, rng.uniform(-bound, bound, (rank, d_in)),
                     np.zeros((d_out, rank)), alpha / rank, dropout, i)
    return chosen


def _set_adapter(lin: Linear, a, b, scale: float, dropout: float, index: int) -> None:
    lin.lora_A = LoRAParam(jnp.asarray(np.asarray(a, np.float32)))
    lin.lora_B = LoRAParam(jnp.asarray(np.asarray(b, np.float32)))
    lin.lora_scale = float(scale)
    lin.lora_dropout = float(dropout)
    lin.lora_id = index


def _merged_weight(lin: Linear) -> np.ndarray:
    """``W + scale · B @ A`` of an adapted Linear, in float32, cast back to ``W``'s dtype."""
    w = np.asarray(lin.weight[...])
    a = np.asarray(lin.lora_A[...], np.float32)
    b = np.asarray(lin.lora_B[...], np.float32)
    return (w.astype(np.float32) + np.float32(lin.lora_scale) * (b @ a)).astype(w.dtype)


def merged_tensors(model) -> dict[str, np.ndarray]:
    """The model's official tensors with every adapter merged (``W + scale · B @ A``, float32,
    cast back to ``W``'s dtype), and no adapter tensors."""
    from rwkv_jax.checkpoint import model_tensors
    tensors = {k: v for k, v in model_tensors(model).items()
               if not k.endswith((".lora_A", ".lora_B"))}
    tensors.update({name: _merged_weight(lin) for name, lin in adapted(model).items()})
    return tensors


def merge(model):
    """A new model with the adapters merged into the weights (``model`` is unchanged): the
    same structure as a plain model, with the weights of :func:`merged_tensors`."""
    out = nnx.clone(model)
    for lin in adapted(out).values():
        lin.weight.set_value(jnp.asarray(_merged_weight(lin)))
        for attr in ("lora_A", "lora_B", "lora_scale", "lora_dropout", "lora_id"):
            delattr(lin, attr)  # back to the class defaults: no adapter
    return out


# ---- files -----------------------------------------------------------------------------------
def file_sha256(path: PathLike) -> str:
    """The hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save(path: PathLike, model, *, base: PathLike | None = None,
         targets: Sequence[str] | None = None, trained_in_full: Sequence[str] = ()
         ) -> pathlib.Path:
    """Write ``model``'s adapters (and the full parameters named in ``trained_in_full``) to
    ``path`` (``.safetensors``) with the metadata of the module docstring; ``base``: the
    checkpoint file they were trained on (its name, path and sha256 are recorded)."""
    path = pathlib.Path(path)
    lins = adapted(model)
    if not lins:
        raise ValueError("the model has no LoRA adapters to save")
    tensors: dict[str, np.ndarray] = {}
    for name, lin in lins.items():
        tensors[_prefix(name) + ".lora_A"] = np.asarray(lin.lora_A[...], np.float32)
        tensors[_prefix(name) + ".lora_B"] = np.asarray(lin.lora_B[...], np.float32)
    if trained_in_full:
        from rwkv_jax.checkpoint import model_tensors
        full = model_tensors(model)
        tensors.update({n: full[n] for n in trained_in_full})
    first = next(iter(lins.values()))
    rank = int(first.lora_A.shape[0])
    meta = {"format": LORA_FORMAT, "format_version": str(LORA_FORMAT_VERSION),
            "rwkv_version": model.config.version, "rank": str(rank),
            "alpha": repr(first.lora_scale * rank), "dropout": repr(first.lora_dropout),
            "targets": json.dumps(list(targets) if targets is not None
                                  else list(default_targets(model.config.version))),
            "trained_in_full": json.dumps(list(trained_in_full))}
    if base is not None:
        base = pathlib.Path(base)
        meta.update(base_name=base.name, base_path=str(base.absolute()),
                    base_sha256=file_sha256(base))
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata=meta)
    return path


def read(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, metadata)`` of an adapter file, the metadata parsed (``rank`` int,
    ``alpha`` float, ``targets`` / ``trained_in_full`` lists). CheckpointError naming the
    file when it is not an rwkv-jax LoRA file."""
    path = pathlib.Path(path)
    try:
        tensors, meta = read_safetensors(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such LoRA file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from None
    if meta.get("format") != LORA_FORMAT:
        raise CheckpointError(f"{path}: not an rwkv-jax LoRA file (metadata format "
                              f"{meta.get('format')!r:.60}, expected {LORA_FORMAT!r})")
    try:
        if int(meta.get("format_version", "")) != LORA_FORMAT_VERSION:
            raise ValueError
        out = dict(meta, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                   targets=json.loads(meta.get("targets", "[]")),
                   trained_in_full=json.loads(meta.get("trained_in_full", "[]")))
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path}: malformed LoRA metadata (format_version "
                              f"{LORA_FORMAT_VERSION}, rank, alpha expected)") from None
    if not (out["rank"] > 0 and math.isfinite(out["alpha"]) and out["alpha"] > 0):
        raise CheckpointError(f"{path}: LoRA rank {out['rank']} / alpha {out['alpha']} must "
                              "be positive")
    return tensors, out


def apply(model, path: PathLike, *, base: PathLike | None = None):
    """Attach the adapters of ``path`` to ``model`` (unmerged) and set the parameters it
    trained in full; returns ``model`` (changed in place).

    ``base``: the checkpoint file ``model`` came from; a sha256 other than the one the
    adapters were trained on is warned about. CheckpointError naming every key that matches
    no weight of the model, every shape that does not fit and any NaN/inf."""
    path = pathlib.Path(path)
    tensors, meta = read(path)
    if base is not None and meta.get("base_sha256"):
        digest = file_sha256(base)
        if digest != meta["base_sha256"]:
            warnings.warn(f"{path}: these adapters were trained on {meta.get('base_name')} "
                          f"(sha256 {meta['base_sha256'][:12]}...), not on {base} (sha256 "
                          f"{digest[:12]}...); the result may not be what was trained",
                          stacklevel=2)
    lins = linears(model)
    params = {dotted_name(p): v
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    problems, pairs = [], {}
    for key in sorted(tensors):
        if m := re.fullmatch(r"(.+)\.lora_([AB])", key):
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensors[key]
            if m.group(1) + ".weight" not in lins:
                problems.append(f"{key}: no Linear weight {m.group(1)}.weight in this model")
        elif key not in params:
            problems.append(f"{key}: matches no parameter of this model")
        elif tuple(tensors[key].shape) != tuple(params[key].shape):
            problems.append(f"{key}: shape {tuple(tensors[key].shape)}, the model's is "
                            f"{tuple(params[key].shape)}")
    for prefix, ab in sorted(pairs.items()):
        lin = lins.get(prefix + ".weight")
        if set(ab) != {"A", "B"}:
            problems.append(f"{prefix}: has lora_{''.join(ab)} without its partner")
        elif lin is not None:
            d_out, d_in = lin.weight.shape
            r = ab["A"].shape[0] if ab["A"].ndim == 2 else -1
            if tuple(ab["A"].shape) != (r, d_in) or tuple(ab["B"].shape) != (d_out, r):
                problems.append(f"{prefix}: lora_A {tuple(ab['A'].shape)} / lora_B "
                                f"{tuple(ab['B'].shape)} do not fit the weight {d_out}x{d_in}"
                                f" (expected [r, {d_in}] and [{d_out}, r])")
    if problem := nonfinite_summary(tensors):
        problems.append(problem)
    if problems:
        raise CheckpointError(f"{path}: does not fit this {model.config.spec.title} model:\n  "
                              + "\n  ".join(problems))
    for i, (prefix, ab) in enumerate(sorted(pairs.items())):
        rank = ab["A"].shape[0]
        _set_adapter(lins[prefix + ".weight"], ab["A"], ab["B"], meta["alpha"] / rank, 0.0, i)
    for key, t in tensors.items():
        if key in params:
            params[key].set_value(jnp.asarray(np.asarray(t), params[key].get_value().dtype))
    return model
