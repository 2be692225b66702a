"""Devices, mesh and shardings of a training run, over one or several processes.

The mesh has axes ``("data", "fsdp", "tensor")``. The batch is split over ``data`` x
``fsdp`` (each device holds ``B / (data·fsdp)`` rows; the ``tensor`` devices of one group
hold the same rows). Parameters are placed by logical axis names, as in MaxText/levanter:

1. each version declares, by official-name pattern, the logical axis of every parameter
   dimension (``VersionSpec.param_axes``: ``emb.weight`` is ``("vocab", "embed")``,
   ``blocks.3.ffn.key.weight`` is ``("ffn", "embed")``, a LayerNorm scale ``("channel",)``);
2. one table, :data:`LOGICAL_AXIS_RULES`, maps logical axes to mesh axes: ``embed`` (the
   residual width, which every large matrix has) over ``fsdp``; ``vocab``, ``ffn`` and
   ``heads`` over ``tensor`` (tensor parallelism, off while ``mesh.tensor=1``).

The rules are tried in order; a rule places its mesh axis on the first dimension of that
logical axis that is still unsplit and divisible by the axis size (else on one already
split by an earlier rule, splitting it further), unless the tensor already uses that mesh
axis: ``("embed", "embed")`` becomes ``P("fsdp", None)``, and a matrix without an
``embed`` dimension falls through to the ``heads -> fsdp`` rule (``("lora", "heads")``:
``P(None, "fsdp")``, or ``P(None, ("tensor", "fsdp"))`` with tensor parallelism). Mesh axes of
size 1 are skipped; a dimension that does not divide is left unsplit (replicated), which
:func:`param_shardings` reports once per (axis, size) in its notes. Vectors and other
names without a rule (``channel``, ``lora``, ``head_dim``) stay replicated.

FSDP: each device stores 1/fsdp of every large tensor and XLA gathers it for the matmul,
then reduce-scatters its gradient. Optimizer state mirrors its parameter's sharding
(:func:`opt_state_shardings`); counters and scalars are replicated. With several processes
the devices are ordered by process, so each process holds one contiguous block of the batch
rows and samples only those (:meth:`Topology.host_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rwkv_jax.config import ConfigError
from rwkv_jax.model.functional import tree_names
from rwkv_jax.train.state import TrainState

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# (logical axis, mesh axis), in priority order (see the module docstring)
LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = (
    ("vocab", "tensor"),
    ("ffn", "tensor"),
    ("heads", "tensor"),
    ("head", "tensor"),    # per-head parameters follow their heads
    ("embed", "fsdp"),
    ("heads", "fsdp"),     # matrices with no embed dimension (LoRA outputs)
    ("ffn", "fsdp"),       # fallbacks when the embed dimension does not divide
    ("vocab", "fsdp"),
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """The mesh and the process layout of one run."""

    mesh: Mesh
    process_index: int
    process_count: int

    @property
    def primary(self) -> bool:
        """The one process with side effects (logs, metrics, exports)."""
        return self.process_index == 0

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def shape(self) -> dict[str, int]:
        """Mesh axis -> size."""
        return dict(self.mesh.shape)

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    def batch_sharding(self, ndim: int, batch_axis: int) -> NamedSharding:
        """Arrays whose axis ``batch_axis`` is the batch, split over the batch axes."""
        spec = [None] * ndim
        spec[batch_axis] = BATCH_AXES
        return self.sharding(P(*spec))

    def host_rows(self, batch: int) -> tuple[int, int]:
        """(host_index, host_count): this process's devices hold global batch rows
        ``host_index·B/host_count ..`` of a batch of ``batch`` rows, one contiguous block."""
        if self.process_count == 1:
            return 0, 1
        shard = self.batch_sharding(2, 0)
        rows = {idx[0].indices(batch)[:2]
                for idx in shard.addressable_devices_indices_map((batch, 1)).values()}
        lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
        size = hi - lo
        if (size * self.process_count != batch or lo % size
                or sum(b - a for a, b in rows) != size):
            raise RuntimeError(f"process {self.process_index}: batch rows {sorted(rows)} are "
                               f"not one block of {batch}/{self.process_count}")
        return lo // size, batch // size

    def global_batch(self, local: np.ndarray, batch_axis: int) -> jax.Array:
        """The global array of which this process holds the rows ``local`` (its block of
        :meth:`host_rows`; with one process, all of them), split over the batch axes."""
        sharding = self.batch_sharding(local.ndim, batch_axis)
        if self.process_count == 1:
            return jax.device_put(local, sharding)
        shape = list(local.shape)
        shape[batch_axis] *= self.process_count
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

    def put_replicated(self, tree) -> Any:
        """Host values every process computed alike -> replicated global arrays."""
        if self.process_count == 1:
            return jax.device_put(tree, self.replicated)
        return jax.device_put(jax.device_get(tree), self.replicated)


def _resolve(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Mesh sizes with one -1 filling the remaining devices; ConfigError naming the key."""
    for axis, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis}: must be a positive number of devices or -1, "
                              f"got {v}")
    fill = [a for a, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"{' and '.join('mesh.' + a for a in fill)} cannot all be -1 "
                          f"(which one fills the devices?)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n % fixed:
            given = " x ".join(f"mesh.{a}={v}" for a, v in sizes.items() if v != -1)
            raise ConfigError(f"{given} does not divide the {n} devices")
        sizes = {**sizes, fill[0]: n // fixed}
    if math.prod(sizes.values()) > n:
        desc = " x ".join(f"{v}" for v in sizes.values())
        raise ConfigError(f"mesh.data x mesh.fsdp x mesh.tensor = {desc} = "
                          f"{math.prod(sizes.values())} devices, but only {n} are available")
    return sizes


def build_topology(data: int, fsdp: int, batch_size: int, tensor: int = 1) -> Topology:
    """The mesh of ``data x fsdp x tensor`` devices (one of them -1: the rest) for a global
    batch of ``batch_size`` rows. Several processes: the same number of devices from each,
    in process order. ConfigError naming ``mesh.*`` / ``train.batch_size`` when it cannot
    be built."""
    p_index, p_count = jax.process_index(), jax.process_count()
    devices = jax.devices()
    sizes = _resolve({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    n = math.prod(sizes.values())
    rows = sizes["data"] * sizes["fsdp"]
    if batch_size % rows:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of mesh.data x "
                          f"mesh.fsdp = {sizes['data']} x {sizes['fsdp']} = {rows} (the "
                          f"devices the batch is split over)")
    if p_count > 1:
        local = jax.local_device_count()
        if n % p_count or n // p_count > local:
            raise ConfigError(f"mesh.data x mesh.fsdp x mesh.tensor = {n}: with {p_count} "
                              f"processes of {local} devices each, needs a multiple of "
                              f"{p_count} up to {p_count * local}")
        per = n // p_count
        if per % sizes["tensor"]:
            raise ConfigError(f"mesh.tensor={sizes['tensor']} must divide the {per} devices "
                              f"each process contributes (a tensor group shares its batch "
                              f"rows, so it cannot span processes)")
        by_process: dict[int, list] = {}
        for d in devices:
            by_process.setdefault(d.process_index, []).append(d)
        chosen = [d for p in sorted(by_process)
                  for d in sorted(by_process[p], key=lambda d: d.id)[:per]]
    else:
        chosen = devices[:n]
    mesh = Mesh(np.array(chosen).reshape(*(sizes[a] for a in AXES)), AXES)
    return Topology(mesh, p_index, p_count)


# ---- parameter placement -----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _patterns(param_axes: tuple) -> tuple:
    return tuple((re.compile(pattern), axes) for pattern, axes in param_axes)


def logical_axes(name: str, param_axes: tuple) -> tuple[str | None, ...] | None:
    """The logical axes of parameter ``name`` under ``param_axes`` (a version's
    ``VersionSpec.param_axes``: the first fullmatching pattern wins); None: no pattern."""
    for pattern, axes in _patterns(param_axes):
        if pattern.fullmatch(name):
            return axes
    return None


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
                   mesh_shape: dict[str, int],
                   rules: Iterable[tuple[str, str]] = LOGICAL_AXIS_RULES
                   ) -> tuple[P, list[tuple[str, int, str, int]]]:
    """The PartitionSpec of a tensor of ``shape`` whose dimensions have logical ``axes``,
    by ``rules`` over a mesh of ``mesh_shape`` (see the module docstring), and what did
    not divide: ``(logical axis, size, mesh axis, mesh size)`` for each rule that found only
    indivisible dimensions while its mesh axis was still unused."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not fit shape {tuple(shape)}")
    placed: list[tuple[str, ...]] = [()] * len(shape)
    skipped = []
    for logical, mesh_axis in rules:
        n = mesh_shape.get(mesh_axis, 1)
        if n == 1 or any(mesh_axis in p for p in placed):
            continue
        dims = [d for d, name in enumerate(axes) if name == logical]
        # a free dimension first; else one already split, split further (P(("tensor","fsdp")))
        for d in sorted(dims, key=lambda d: bool(placed[d])):
            ways = math.prod(mesh_shape[a] for a in placed[d]) * n
            if shape[d] % ways:
                skipped.append((logical, int(shape[d]), mesh_axis, n))
                continue
            placed[d] = placed[d] + (mesh_axis,)
            break
    skipped = [s for s in skipped if not any(s[2] in p for p in placed)]
    return P(*(p[0] if len(p) == 1 else (p or None) for p in placed)), skipped


def param_shardings(topology: Topology, tree, param_axes: tuple,
                    rules: Iterable[tuple[str, str]] = LOGICAL_AXIS_RULES
                    ) -> tuple[Any, list[str]]:
    """``(shardings, notes)``: a NamedSharding for every array leaf of the parameter tree
    ``tree`` (official names; see :func:`partition_spec`), and one line for each logical
    axis size that did not divide its mesh axis and each parameter name that no pattern of
    ``param_axes`` declares (replicated), for the run log."""
    rules = tuple(rules)
    mesh_shape = topology.shape
    notes: dict[Any, str] = {}

    def place(name: str, leaf) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        axes = logical_axes(name, param_axes)
        if axes is None:
            generic = re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name)
            notes.setdefault(generic, f"{generic}: no logical axes declared for it "
                                      f"(VersionSpec.param_axes); replicated")
            return topology.replicated
        try:
            spec, skipped = partition_spec(axes, shape, mesh_shape, rules)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (VersionSpec.param_axes)") from None
        for logical, size, mesh_axis, n in skipped:
            notes.setdefault((logical, size, mesh_axis, n),
                             f"'{logical}' dimensions of size {size} do not divide over "
                             f"{mesh_axis}={n}: replicated there (e.g. {name})")
        return topology.sharding(spec)

    shardings = jax.tree.map(place, tree_names(tree), tree)
    return shardings, list(notes.values())


def opt_state_shardings(topology: Topology, tx: optax.GradientTransformation, opt_state,
                        params_shardings) -> Any:
    """Shardings of ``tx``'s state ``opt_state`` (arrays or shape structs): every copy of
    the parameter tree in it (Adam's moments) has the parameters' shardings; everything
    else (step counters, scalars) is replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, params_shardings,
                                 transform_non_params=lambda _: topology.replicated)


def state_shardings(topology: Topology, state: TrainState, tx: optax.GradientTransformation,
                    param_axes: tuple) -> tuple[TrainState, list[str]]:
    """``(shardings, notes)`` of a whole :class:`TrainState` (arrays or shape structs):
    parameters and frozen parameters by the rules, optimizer state mirroring the
    parameters, step and rng replicated."""
    params, notes = param_shardings(topology, state.params, param_axes)
    frozen, notes_frozen = param_shardings(topology, state.frozen, param_axes)
    shardings = TrainState(step=topology.replicated, params=params, frozen=frozen,
                           opt_state=opt_state_shardings(topology, tx, state.opt_state, params),
                           rng=topology.replicated)
    return shardings, list(dict.fromkeys(notes + notes_frozen))


def bytes_per_device(tree) -> int:
    """Bytes of ``tree``'s arrays held on one device (the first), after sharding."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "addressable_shards") and x.addressable_shards:
            shard = x.addressable_shards[0].data
            total += shard.size * shard.dtype.itemsize
        else:
            total += np.size(x) * np.dtype(x.dtype).itemsize
    return total


def total_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays, unsharded (the global arrays' sizes)."""
    return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
