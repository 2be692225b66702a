"""What a version module declares: :class:`VersionSpec`, and the name-map contract.

Every RWKV version lives in one module of :mod:`rwkv_jax.versions` that builds its mixers and
fills in one :class:`VersionSpec`; :mod:`rwkv_jax.versions` registers it. Model assembly,
config validation, checkpoint I/O, state files, the optimizer and the WKV-form check look
things up here instead of testing version strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from rwkv_jax.io.errors import CheckpointError

Shapes = Mapping[str, tuple[int, ...]]  # official key -> tensor shape
Tensors = Mapping[str, Any]             # official key -> array


@dataclasses.dataclass(frozen=True)
class Extra:
    """A config field only some versions have (a LoRA rank, the head size, an eps).

    ``default(n_embd)`` gives its value when the config leaves it unset; ``doc`` says what
    it is for this version (the same name may mean a different tensor on another version).
    """

    default: Callable[[int], Any]
    doc: str


@dataclasses.dataclass(frozen=True)
class NameMap:
    """One ecosystem's tensor names and layouts (Hugging Face, flash-linear-attention) for a
    version: ``to_official``/``from_official`` are exact inverses on complete checkpoints;
    ``recognise(keys)`` says whether a checkpoint's keys are in these names."""

    name: str
    recognise: Callable[[set[str]], bool]
    to_official: Callable[[Tensors], dict[str, Any]]
    from_official: Callable[[Tensors], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class VersionSpec:
    """Everything specific to one RWKV version.

    version: "4", "5.1", "5.2", "6" or "7" (the config's ``version``).
    title: what to call it in messages ("RWKV-6 Finch").
    time_mix, channel_mix: the mixer classes ``cls(cfg, layer_id, rngs=...)``; the time-mix
      class also builds the version's WKV state template, ``time_mix.init_state(cfg, B)``.
    wkv_op: the name of its WKV recurrence ("wkv4", "wkv6", "wkv7"), the key of the AUTO
      table in :mod:`rwkv_jax.ops.impl`.
    wkv_forms: the concrete WKV forms (:class:`~rwkv_jax.ops.impl.WkvImpl`) of the version's
      recurrence, the values a config may name in ``wkv_impl`` besides "auto".
    extras: config fields beyond the common ones, with defaults (see :class:`Extra`).
    ffn_size: the default channel-mix width F for a width C.
    detect: whether official-named checkpoint shapes are this version (asked in registry
      order, most specific version first).
    infer: the ``extras`` a checkpoint's shapes determine (head size, LoRA ranks).
    lr_multipliers: learning-rate scale by parameter leaf name (the official groups).
    names: ``{"hf": NameMap, "fla": NameMap}`` where those ecosystems have this version.
    unused_keys: regexes of official keys some checkpoints carry that the model does not
      use (dropped on load).
    lora_targets: regexes (full match) of the official weight names LoRA adapts by default:
      the time-mix and channel-mix projection matrices (:mod:`rwkv_jax.lora`).
    param_axes: ``(regex, logical axes)`` pairs: each parameter whose official name
      fullmatches the regex has those logical axis names, one per dimension (None: a
      dimension no rule shards), e.g. ``("vocab", "embed")``; the first matching pair wins.
      :data:`COMMON_PARAM_AXES` first, then the version's own. The mesh's
      ``LOGICAL_AXIS_RULES`` (:mod:`rwkv_jax.train.mesh`) map these names to mesh axes.
    """

    version: str
    title: str
    time_mix: type
    channel_mix: type
    wkv_op: str
    wkv_forms: tuple
    extras: Mapping[str, Extra]
    ffn_size: Callable[[int], int]
    detect: Callable[[Shapes], bool]
    infer: Callable[[Shapes], dict[str, Any]]
    lr_multipliers: Mapping[str, float]
    names: Mapping[str, NameMap] = dataclasses.field(default_factory=dict)
    unused_keys: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    param_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    def drop_unused(self, tensors: Tensors) -> dict[str, Any]:
        """``tensors`` without the keys this version's model does not use."""
        if not self.unused_keys:
            return dict(tensors)
        pattern = re.compile("|".join(f"(?:{p})" for p in self.unused_keys))
        return {k: v for k, v in tensors.items() if not pattern.fullmatch(k)}


# Logical axis names of parameter dimensions (what :mod:`rwkv_jax.train.mesh` shards by):
#   vocab      the vocabulary V
#   embed      the residual width C (inputs of projections, outputs back into the stream)
#   heads      the time-mix width H·N (projection outputs the WKV reads; = C in RWKV 4-7)
#   ffn        the channel-mix hidden width F
#   lora       a low-rank bottleneck (RWKV-6/7 data-dependent mixes and decays)
#   head       the head count H of per-head parameters; head_dim: the head size N
#   channel    a per-channel vector (LayerNorm scales, token-shift mixes, decays, bonuses):
#              small, so the default rules never split it
# Official [1, 1, C] vectors keep their two leading singleton dimensions as None.
LOGICAL_AXES = ("vocab", "embed", "heads", "ffn", "lora", "head", "head_dim", "channel")
VEC = (None, None, "channel")
COMMON_PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"emb\.weight", ("vocab", "embed")),
    (r"head\.weight", ("vocab", "embed")),
    (r"(blocks\.\d+\.)?ln(0|1|2|_out)\.(weight|bias)", ("channel",)),
    (r"blocks\.\d+\.att\.ln_x\.(weight|bias)", ("channel",)),
    (r"blocks\.\d+\.att\.(receptance|key|value|gate)\.weight", ("heads", "embed")),
    (r"blocks\.\d+\.att\.output\.weight", ("embed", "heads")),
    (r"blocks\.\d+\.ffn\.key\.weight", ("ffn", "embed")),
    (r"blocks\.\d+\.ffn\.value\.weight", ("embed", "ffn")),
    (r"blocks\.\d+\.ffn\.receptance\.weight", ("embed", "embed")),
)


def shape_of(shapes: Shapes, key: str, axis: int) -> int | None:
    """``shapes[key][axis]``; None when the key is absent; CheckpointError naming the tensor
    when it has no non-zero dimension ``axis`` (a malformed checkpoint)."""
    s = shapes.get(key)
    if s is None:
        return None
    if len(s) <= axis or s[axis] == 0:
        raise CheckpointError(f"tensor '{key}' has shape {tuple(s)}, which has no non-zero "
                              f"dimension {axis} to read a size from (malformed)")
    return int(s[axis])
